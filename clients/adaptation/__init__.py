"""Local adaptation methods, by name (importing this package does not import torch)."""

from clients.adaptation.configs import METHODS
from clients.adaptation.context import AdaptContext

__all__ = ["METHODS", "AdaptContext"]
