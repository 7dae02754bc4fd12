"""The registry of local adaptation methods.

A method is a function ``adapt(model, target, context, config)`` that changes ``model``
in place on the site's unlabeled target images, plus a typed config dataclass whose
defaults are the documented recipe. Every method is followed by the exact BN statistics
pass (see ``clients.site``), so methods need not care about running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from common.models import Segmenter
from common.typed_options import build_options, closest

__all__ = ["METHODS", "AdaptContext", "Method", "get_method", "make_config", "register"]


@dataclass
class AdaptContext:
    """What a site holds besides its target images."""

    source: Dataset | None = None  # labeled source set, when the site has it (HRDA)
    checkpoint_dir: str = ""  # where long runs keep resumable state; "" = no resume
    progress: bool = True
    seed: int = 0
    backbone_weights: str = ""  # ImageNet weights for the feature distance, when given
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the method


AdaptFn = Callable[[Segmenter, Dataset, AdaptContext, Any], None]


@dataclass(frozen=True)
class Method:
    name: str
    config_type: type
    adapt: AdaptFn
    needs_source: bool = False
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(
    name: str, config_type: type, needs_source: bool = False, summary: str = ""
) -> Callable[[AdaptFn], AdaptFn]:
    def wrap(fn: AdaptFn) -> AdaptFn:
        METHODS[name] = Method(name, config_type, fn, needs_source, summary)
        return fn

    return wrap


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in METHODS:
        hint = closest(name, METHODS)
        raise ValueError(f"unknown adaptation method {name!r}{hint}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_config(method: Method, options: Mapping[str, Any]) -> Any:
    """The method's config dataclass from kebab- or snake-case options; unknown keys and wrong types are errors."""
    return build_options(method.config_type, options, f"method {method.name!r}")


def _load_builtin_methods() -> None:
    """Import the modules that register the shipped methods."""
    import importlib

    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)


BUILTIN_METHOD_MODULES = [
    "clients.adaptation.adabn",
    "clients.adaptation.tent",
    "clients.adaptation.selftrain",
    "clients.adaptation.sfda",
    "clients.adaptation.hrda",
]
