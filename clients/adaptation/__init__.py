"""Local adaptation methods, by name."""

from clients.adaptation.registry import METHODS, AdaptContext, Method, get_method, make_config

__all__ = ["METHODS", "AdaptContext", "Method", "get_method", "make_config"]
