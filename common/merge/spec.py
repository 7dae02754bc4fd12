"""What a merge is asked to do, as one typed, validated value: the method, its options, the BN rule.

Every entry point (the ServerApp, ``fedmerge merge``, ``fedmerge compare``) builds a
:class:`MergeSpec` and hands it to the one merge engine, so a method means the same
thing everywhere. Each merge method is registered here with its typed options (as
mergekit's methods declare theirs) and what it needs: whether it runs streaming, holding
one site at a time, takes per-site weights, or needs the shared start. Its maths is in
``common.merge.methods``, imported only when a merge runs, so this module imports no
torch and a configuration is checked in an instant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from common.options.registry import Registry
from common.options.typed import OptionError, closest

__all__ = [
    "BUFFER_MODES",
    "MERGE_METHODS",
    "PRECISIONS",
    "WEIGHTINGS",
    "LayerwiseOptions",
    "LinearOptions",
    "MergeSpec",
    "MethodOptions",
    "TaskArithmeticOptions",
    "TiesOptions",
    "method_options",
]

WEIGHTINGS = ("uniform", "counts", "explicit")
BUFFER_MODES = ("gaussian", "reference", "average", "first")
PRECISIONS = ("float64", "float32")


MERGE_METHODS = Registry("merge method")
_OPTION_ALIASES = {"lambda": "lam"}


@dataclass(frozen=True)
class MethodOptions:
    """What every merge method declares besides its options: how it may be run."""

    streaming: ClassVar[bool] = True  # merges one site at a time; False: needs every model at once
    weighted: ClassVar[bool] = True  # takes per-site weights (counts or explicit); False: sites count equally
    needs_base: ClassVar[bool] = False  # works on task vectors, so needs the shared starting model


@MERGE_METHODS.register("linear", target="common.merge.methods:LinearMerger",
                        summary="the weighted average of the sites' parameters")  # fmt: skip
@dataclass(frozen=True)
class LinearOptions(MethodOptions):
    """The weighted average of the sites' parameters has no options of its own."""


@MERGE_METHODS.register("task-arithmetic", target="common.merge.methods:TaskArithmeticMerger",
                        summary="θ₀ + λ Σ τ_i (τ_i = θ_i - θ₀)")  # fmt: skip
@dataclass(frozen=True)
class TaskArithmeticOptions(MethodOptions):
    weighted: ClassVar[bool] = False
    needs_base: ClassVar[bool] = True
    lam: float = 0.3  # the scaling the Task Arithmetic paper found best on its tasks

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise OptionError(f"task-arithmetic: lam must be finite, not {self.lam}")


@MERGE_METHODS.register("ties", target="common.merge.methods:TiesMerger",
                        summary="TIES: trim each τ_i to its top-k, elect signs, disjoint mean, θ₀ + λ τ")  # fmt: skip
@dataclass(frozen=True)
class TiesOptions(MethodOptions):
    weighted: ClassVar[bool] = False
    needs_base: ClassVar[bool] = True
    k: float = 0.2  # fraction of each task vector kept (TIES's default top-20%)
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise OptionError(f"ties: k (fraction of entries kept) must be in (0, 1], not {self.k}")
        if not math.isfinite(self.lam):
            raise OptionError(f"ties: lam must be finite, not {self.lam}")


@MERGE_METHODS.register("layerwise", target="common.merge.methods:LayerwiseMerger",
                        summary="linear in the early layers, leaning towards one anchor site's with depth")  # fmt: skip
@dataclass(frozen=True)
class LayerwiseOptions(MethodOptions):
    """Layer-wise merging after Alcover-Couso et al. 2024 (arXiv 2409.15813): the early layers, which extract
    features, are averaged; from ``start`` (a fraction of the depth) on, each layer leans towards the ``anchor``
    site's, linearly, until the anchor holds ``strength`` more of the last layer than the average gives it."""

    anchor: str = ""  # the site whose later layers the merge keeps closest to
    start: float = 0.5
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not self.anchor:
            raise OptionError("layerwise: name the anchor site (anchor=SITE)")
        if not 0.0 <= self.start < 1.0:
            raise OptionError(f"layerwise: start (a fraction of the depth) must be in [0, 1), not {self.start}")
        if not 0.0 <= self.strength <= 1.0:
            raise OptionError(f"layerwise: strength must be in [0, 1], not {self.strength}")


def method_options(name: str, raw: Mapping[str, Any]) -> MethodOptions:
    """The method's typed options from loose ``raw`` values (strings from a command line, TOML values)."""
    return MERGE_METHODS.get(name).make_options(raw, _OPTION_ALIASES)


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
        entry = MERGE_METHODS.get(self.method)
        if not isinstance(self.options, entry.options):
            raise OptionError(f"merge method {self.method!r} takes {entry.options.__name__}, not {self.options!r}")
        _choice(self.weighting, WEIGHTINGS, "param-weighting")
        _choice(self.buffers, BUFFER_MODES, "buffer-mode")
        _choice(self.precision, PRECISIONS, "param-precision")
        if not self.options.weighted and self.weighting != "uniform":
            raise OptionError(
                f"merge method {self.method!r} weights every site equally; param-weighting must be uniform"
            )
        if not 0.0 < self.max_share <= 1.0:
            raise OptionError(f"max-site-share must be in (0, 1], not {self.max_share}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0.0):
            raise OptionError(f"clip-norm must be a finite number >= 0 (0: off), not {self.clip_norm}")

    @property
    def needs_base(self) -> bool:
        return self.options.needs_base or self.clip_norm > 0

    def describe(self) -> dict[str, Any]:
        """The spec as plain values, for reports."""
        options = {k: v for k, v in vars(self.options).items()}
        return {"method": self.method, "options": options, "weighting": self.weighting, "buffers": self.buffers,
                "equal_site_stats": self.equal_site_stats, "precision": self.precision,
                "max_share": self.max_share, "clip_norm": self.clip_norm}  # fmt: skip
