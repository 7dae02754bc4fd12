"""Local adaptation methods, by name (importing this package does not import torch)."""

from clients.adaptation.registry import (
    METHODS,
    AdaptContext,
    Method,
    get_method,
    load_builtin_methods,
    make_config,
    method_spec,
)

__all__ = ["METHODS", "AdaptContext", "Method", "get_method", "load_builtin_methods", "make_config", "method_spec"]
