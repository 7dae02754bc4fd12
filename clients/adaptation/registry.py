"""The registry of local adaptation methods.

A method is a function ``adapt(model, target, context, config)`` that changes ``model``
in place on the site's unlabeled target images, plus a typed config dataclass whose
defaults are the documented recipe. Every method is followed by the exact BN statistics
pass (see ``clients.site``), so methods need not care about running statistics.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clients.adaptation.configs import BUILTIN, MethodSpec
from common.device.spec import Compute
from common.options.typed import build_options, closest

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from common.models.architectures import Segmenter

__all__ = ["METHODS", "AdaptContext", "Method", "get_method", "make_config", "method_spec", "register"]


@dataclass
class AdaptContext:
    """What a site holds besides its target images."""

    source: Dataset | None = None  # labeled source set, when the site has it (HRDA)
    checkpoint_dir: str = ""  # where long runs keep resumable state; "" = no resume
    progress: bool = True
    seed: int = 0
    backbone_weights: str = ""  # ImageNet weights for the feature distance, when given
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the method
    compute: Compute = field(default_factory=Compute)  # the site's device (resolved) and amp; the CPU at float32


AdaptFn = Callable[["Segmenter", "Dataset", AdaptContext, Any], None]


@dataclass(frozen=True)
class Method:
    name: str
    config_type: type
    adapt: AdaptFn
    needs_source: bool = False
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(
    name: str, config_type: type | None = None, needs_source: bool = False, summary: str = ""
) -> Callable[[AdaptFn], AdaptFn]:
    """Add ``name``'s training code; a built-in method's options and needs come from its ``BUILTIN`` spec."""

    def wrap(fn: AdaptFn) -> AdaptFn:
        if config_type is None:
            spec = BUILTIN[name]
            METHODS[name] = Method(name, spec.config_type, fn, spec.needs_source, spec.summary)
        else:
            METHODS[name] = Method(name, config_type, fn, needs_source, summary)
        return fn

    return wrap


def method_spec(name: str) -> Method | MethodSpec:
    """The method's options and needs, without importing any training code (or torch) for a built-in one."""
    if name in METHODS:
        return METHODS[name]
    if name in BUILTIN:
        return BUILTIN[name]
    known = sorted({*METHODS, *BUILTIN})
    raise ValueError(f"unknown adaptation method {name!r}{closest(name, known)}; choose one of {', '.join(known)}")


def get_method(name: str) -> Method:
    spec = method_spec(name)
    if isinstance(spec, MethodSpec):
        importlib.import_module(spec.module)
    return METHODS[name]


def load_builtin_methods() -> dict[str, Method]:
    """Every built-in method with its training code (imports torch)."""
    for spec in BUILTIN.values():
        importlib.import_module(spec.module)
    return METHODS


def make_config(method: Method | MethodSpec, options: Mapping[str, Any]) -> Any:
    """The method's config dataclass from kebab- or snake-case options; unknown keys and wrong types are errors."""
    return build_options(method.config_type, options, f"method {method.name!r}")
