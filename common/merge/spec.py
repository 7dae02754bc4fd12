"""What a merge is asked to do, as one typed, validated value: the method, its options, the BN rule.

Every entry point (the ServerApp, ``fedmerge merge``, ``fedmerge compare``) builds a
:class:`MergeSpec` and hands it to the one merge engine, so a method means the same
thing everywhere. Each merge method declares its typed options here (as mergekit's
methods do) and whether it can run streaming, holding one site at a time. This module
imports no torch, so a configuration can be checked in an instant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.options.typed import OptionError, build_options, closest

__all__ = [
    "BUFFER_MODES",
    "METHODS",
    "PRECISIONS",
    "WEIGHTINGS",
    "LinearOptions",
    "MergeSpec",
    "MethodInfo",
    "TaskArithmeticOptions",
    "TiesOptions",
    "method_info",
    "method_options",
]

WEIGHTINGS = ("uniform", "counts", "explicit")
BUFFER_MODES = ("gaussian", "reference", "average", "first")
PRECISIONS = ("float64", "float32")


@dataclass(frozen=True)
class LinearOptions:
    """The weighted average of the sites' parameters has no options of its own."""


@dataclass(frozen=True)
class TaskArithmeticOptions:
    lam: float = 0.3  # the scaling the Task Arithmetic paper found best on its tasks

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise OptionError(f"task-arithmetic: lam must be finite, not {self.lam}")


@dataclass(frozen=True)
class TiesOptions:
    k: float = 0.2  # fraction of each task vector kept (TIES's default top-20%)
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise OptionError(f"ties: k (fraction of entries kept) must be in (0, 1], not {self.k}")
        if not math.isfinite(self.lam):
            raise OptionError(f"ties: lam must be finite, not {self.lam}")


@dataclass(frozen=True)
class MethodInfo:
    """A merge method as the registry declares it."""

    name: str
    options: type
    summary: str
    streaming: bool = True  # merges one site at a time; False: needs every model at once
    weighted: bool = True  # takes per-site weights (counts or explicit); False: sites count equally
    needs_base: bool = False  # works on task vectors, so needs the shared starting model


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("linear", LinearOptions, "the weighted average of the sites' parameters"),
        MethodInfo(
            "task-arithmetic", TaskArithmeticOptions, "θ₀ + λ Σ τ_i (τ_i = θ_i - θ₀)", weighted=False, needs_base=True
        ),
        MethodInfo(
            "ties",
            TiesOptions,
            "TIES: trim each τ_i to its top-k, elect signs, disjoint mean, θ₀ + λ τ",
            weighted=False,
            needs_base=True,
        ),
    )
}

_OPTION_ALIASES = {"lambda": "lam"}


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise OptionError(f"unknown merge method {name!r}{closest(name, METHODS)}; methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str, raw: Mapping[str, Any]) -> Any:
    """The method's typed options from loose ``raw`` values (strings from a command line, TOML values)."""
    return build_options(method_info(name).options, raw, f"merge method {name!r}", _OPTION_ALIASES)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise OptionError(f"{what} must be one of {', '.join(allowed)}, not {value!r}{closest(value, allowed)}")


@dataclass(frozen=True)
class MergeSpec:
    """One merge: the parameter method and its options, site weights, the BN rule, and the safeguards.

    ``weighting``: ``uniform`` (every site 1), ``counts`` (its number of images) or
    ``explicit`` (weights given with each update). ``buffers``: ``gaussian`` (exact
    statistics pooled by their sample counts), ``reference`` (the published rule, n =
    ``num_batches_tracked``), ``average`` (averaged like parameters) or ``first``.
    ``equal_site_stats`` pools statistics with every site weighted equally.
    ``precision`` is that of the parameter sums. ``max_share`` caps any one site's share
    of the weight (parameters and BN pooling alike; 1 = no cap). ``clip_norm`` > 0 scales
    a site's parameter change from the shared start down to that L2 norm.
    """

    method: str
    options: Any
    weighting: str
    buffers: str
    equal_site_stats: bool
    precision: str
    max_share: float
    clip_norm: float

    def __post_init__(self) -> None:
        info = method_info(self.method)
        if not isinstance(self.options, info.options):
            raise OptionError(f"merge method {self.method!r} takes {info.options.__name__}, not {self.options!r}")
        _choice(self.weighting, WEIGHTINGS, "param-weighting")
        _choice(self.buffers, BUFFER_MODES, "buffer-mode")
        _choice(self.precision, PRECISIONS, "param-precision")
        if not info.weighted and self.weighting != "uniform":
            raise OptionError(
                f"merge method {self.method!r} weights every site equally; param-weighting must be uniform"
            )
        if not 0.0 < self.max_share <= 1.0:
            raise OptionError(f"max-site-share must be in (0, 1], not {self.max_share}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0.0):
            raise OptionError(f"clip-norm must be a finite number >= 0 (0: off), not {self.clip_norm}")

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.method]

    @property
    def needs_base(self) -> bool:
        return self.info.needs_base or self.clip_norm > 0

    def describe(self) -> dict[str, Any]:
        """The spec as plain values, for reports."""
        options = {k: v for k, v in vars(self.options).items()}
        return {"method": self.method, "options": options, "weighting": self.weighting, "buffers": self.buffers,
                "equal_site_stats": self.equal_site_stats, "precision": self.precision,
                "max_share": self.max_share, "clip_norm": self.clip_norm}  # fmt: skip
