"""The site guard: a site never sends a model that scores below its own start on its own images.

A site whose adaptation drifts towards its own mistakes lowers its domain's accuracy and
drags the merge down with it (measured on CamVid), and no site has labels to notice. So
after the method, the site compares the adapted model with what it would have sent without
adapting: the start's parameters with the exact BN statistics of its own images (AdaBN).
Both are scored by label-free scores of ``common.scoring.label_free`` on the same few images, each
under its own exact statistics, as it would be shipped. When the adapted model scores below
the start by more than the margin on any score the guard names, the site falls back to the
start's parameters, and the exact statistics pass that follows every method gives it the
start's statistics on the site's images. Every registered score of both models goes into
the site's metrics with the decision, so a run's report shows what each site's guard saw.

The ``interpolate`` rule chooses instead of refusing: it scores the points θ₀ + a(θ - θ₀)
between the start (a = 0) and the adapted model (a = 1), each under its exact statistics, and
sends the point the first guard score rates best (by more than the margin over the adapted
model), like an early stop chosen by a label-free score, without keeping checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.bn.stats import BNStatsConfig, exact_bn_statistics
from common.config.run import ConfigError, check_values, declared_defaults
from common.data import image_batches
from common.models.segmenter import Segmenter
from common.options.typed import closest
from common.scoring.label_free import label_free_scores, score_images
from common.scoring.scores import SCORES

__all__ = ["ALPHA", "FELL_BACK", "GUARD_KEYS", "GUARD_RULES", "INTERPOLATION_POINTS", "GuardConfig", "GuardDecision",
           "guard_adaptation", "score_names"]  # fmt: skip

log = logging.getLogger(__name__)

# run-config keys; node config may override each
GUARD_KEYS = ("guard", "guard-score", "guard-margin", "guard-rule", "guard-max-change")
GUARD_RULES = ("fallback", "interpolate")  # as common.config.run checks them
INTERPOLATION_POINTS = (0.25, 0.5, 0.75)  # the points between the start and the adapted model ``interpolate`` scores
FELL_BACK = "guard-fell-back"
ALPHA = "guard-alpha"  # where on the line from the start (0) to the adapted model (1) the sent model lies


def score_names(text: str) -> tuple[str, ...]:
    """``"mix,diversity"`` -> ``("mix", "diversity")``: the guard holds only if every named score holds."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class GuardConfig:
    """Whether a site guards its adaptation, by which label-free scores, with what tolerance."""

    enabled: bool
    scores: tuple[str, ...]  # the site falls back when any of them drops below the start's by more than margin
    margin: float  # the adapted model may score this much below the start (another point above it) and be sent
    rule: str = "fallback"  # fallback: the adapted model or the start; interpolate: the best point between them
    max_change: float = field(default=1.0, repr=False)  # the largest share of the start's labels a sent model changes

    def __post_init__(self) -> None:
        if self.rule not in GUARD_RULES:
            raise ConfigError(f"guard-rule must be one of {', '.join(GUARD_RULES)}, not {self.rule!r}"
                              f"{closest(self.rule, GUARD_RULES)}")  # fmt: skip
        if not self.scores:
            raise ConfigError("guard-score names no score")
        for name in self.scores:
            if name not in SCORES:
                raise ConfigError(
                    f"guard-score must name scores among {', '.join(SCORES)}, not {name!r}{closest(name, SCORES)}"
                )
        if not self.margin >= 0:
            raise ConfigError(f"guard-margin must be >= 0, not {self.margin}")
        if not 0.0 < self.max_change <= 1.0:
            raise ConfigError(f"guard-max-change must be in (0, 1] (1: off), not {self.max_change}")

    @classmethod
    def read(cls, values: Mapping[str, Any] | None = None) -> GuardConfig:
        """From the run-config keys ``guard``, ``guard-score``, ``guard-margin``; absent ones: their declared default.

        One reader for the run config, the node config, the experiment config and ``fedmerge
        adapt``, so each key has one default (``pyproject.toml``) and one check.
        """
        unknown = sorted(set(values or {}) - set(GUARD_KEYS))
        if unknown:
            raise ConfigError(f"unknown guard key {unknown[0]!r}{closest(unknown[0], GUARD_KEYS)}")
        defaults = declared_defaults()
        merged = check_values({**{k: defaults[k] for k in GUARD_KEYS}, **dict(values or {})})
        return cls(bool(merged["guard"]), score_names(str(merged["guard-score"])), float(merged["guard-margin"]),
                   str(merged["guard-rule"]), float(merged["guard-max-change"]))  # fmt: skip

    def values(self) -> dict[str, Any]:
        """The run-config keys that give this guard back through ``read``."""
        return {"guard": self.enabled, "guard-score": ",".join(self.scores), "guard-margin": self.margin,
                "guard-rule": self.rule, "guard-max-change": self.max_change}  # fmt: skip

    def recipe(self) -> dict[str, str]:
        """Its part of a cache key: nothing when off, so what was cached before the guard existed stays valid."""
        if not self.enabled:
            return {}
        limit = {"guard-max-change": repr(self.max_change)} if self.max_change < 1.0 else {}
        return {"guard": repr(self), **limit}  # unlimited: the key of every entry cached before the limit existed


@dataclass(frozen=True)
class GuardDecision:
    """What the guard measured and did; ``metrics`` is what the site's update carries."""

    start: dict[str, float]  # every label-free score of the start (AdaBN) on the site's images
    adapted: dict[str, float]  # the same of the adapted model; empty when its weights are not finite
    fell_back: bool
    seconds: float
    alpha: float = 1.0  # the point sent, from the start (0) to the adapted model (1)
    points: dict[float, float] = field(default_factory=dict)  # interpolate: each inner point's first guard score

    def metrics(self) -> dict[str, float]:
        out = {f"guard-start-{k}": v for k, v in self.start.items()}
        out.update({f"guard-adapted-{k}": v for k, v in self.adapted.items()})
        out.update({f"guard-point-{a:g}": v for a, v in self.points.items()})
        out.update({FELL_BACK: float(self.fell_back), ALPHA: self.alpha, "guard-seconds": self.seconds})
        return out


def _finite(model: Segmenter) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _as_shipped(model: Segmenter, state: Mapping[str, Tensor] | None, target: Dataset, batch_size: int,
                bn_mode: str) -> Segmenter:  # fmt: skip
    """A copy of ``model`` (with ``state``, if given) under the exact BN statistics of ``target``."""
    out = copy.deepcopy(model)
    if state is not None:
        out.load_state_dict(dict(state))
    exact_bn_statistics(out, image_batches(target, batch_size), BNStatsConfig(bn_mode))
    return out.eval()


def _scores(candidate: Segmenter, start: Segmenter, target: Dataset, batch_size: int, seed: int) -> dict[str, float]:
    """Every label-free score on the evenly spaced score images; ``agreement`` is with the start.

    Batches hold at least two images: ``mix`` pastes one image's classes onto another.
    """
    batches = image_batches(score_images(target), max(batch_size, 2))
    return label_free_scores(candidate, start, batches, seed=seed)


def guard_adaptation(model: Segmenter, start_state: Mapping[str, Tensor], target: Dataset, config: GuardConfig,
                     *, batch_size: int = 8, bn_mode: str = "batch", seed: int = 0) -> GuardDecision:  # fmt: skip
    """Judge the adapted ``model`` against its start and, when it scores worse, put the start's weights back.

    A model with non-finite weights always falls back (its predictions mean nothing, and a
    constant prediction would even look perfectly consistent to ``mix``).
    """
    started = time.perf_counter()
    start = _as_shipped(model, start_state, target, batch_size, bn_mode)
    start_scores = _scores(start, start, target, batch_size, seed)
    missing = [name for name in config.scores if name not in start_scores]
    if missing:
        raise ValueError(f"guard-score {missing[0]!r} cannot be measured on {len(target)} image(s)")  # type: ignore[arg-type]
    adapted_scores: dict[str, float] = {}
    if _finite(model):
        adapted_scores = _scores(_as_shipped(model, None, target, batch_size, bn_mode), start, target, batch_size,
                                 seed)  # fmt: skip
    if config.rule == "interpolate" and adapted_scores:
        return _interpolate(model, start_state, target, config, start_scores, adapted_scores, started,
                            batch_size=batch_size, bn_mode=bn_mode, seed=seed, start=start)  # fmt: skip
    below = [n for n in config.scores if not adapted_scores.get(n, -math.inf) >= start_scores[n] - config.margin]
    if adapted_scores and not _within_change(adapted_scores, config):
        below.append("agreement (guard-max-change)")
    if below:
        model.load_state_dict(dict(start_state))
    log.info("guard: adapted %s, start %s (margin %g): %s", _shown(adapted_scores, config.scores),
             _shown(start_scores, config.scores), config.margin,
             f"fell back to the start ({', '.join(below)} below)" if below else "kept")  # fmt: skip
    return GuardDecision(start_scores, adapted_scores, bool(below), time.perf_counter() - started,
                         0.0 if below else 1.0)  # fmt: skip


def _within_change(scores: Mapping[str, float], config: GuardConfig) -> bool:
    """Whether a model scored against the start changes at most ``max_change`` of the start's labels."""
    return config.max_change >= 1.0 or scores["agreement"] >= 1.0 - config.max_change


def interpolated(start_state: Mapping[str, Tensor], adapted: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The start's state, each parameter moved ``alpha`` of the way to the adapted model's; buffers the start's."""
    names = set(dict(adapted))
    return {k: (v + alpha * (adapted[k] - v)) if k in names and v.is_floating_point() else v.clone()
            for k, v in start_state.items()}  # fmt: skip


def _interpolate(model: Segmenter, start_state: Mapping[str, Tensor], target: Dataset, config: GuardConfig,
                 start_scores: dict[str, float], adapted_scores: dict[str, float], started: float, *,
                 batch_size: int, bn_mode: str, seed: int, start: Segmenter) -> GuardDecision:  # fmt: skip
    """Send the point of the line the first guard score rates best, if it beats the adapted model by the margin.

    Only points within ``max_change`` of the start's labels are candidates (the start always is): a
    consistency score alone would rate a model collapsed towards a few classes best.
    """
    score = config.scores[0]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    points, allowed = {}, {0.0}
    for alpha in INTERPOLATION_POINTS:
        point = _as_shipped(model, interpolated(start_state, params, alpha), target, batch_size, bn_mode)
        scores = _scores(point, start, target, batch_size, seed)
        points[alpha] = scores[score]
        if _within_change(scores, config):
            allowed.add(alpha)
    values = {a: v for a, v in {0.0: start_scores[score], **points}.items() if a in allowed}
    alpha = max(values, key=lambda a: values[a])  # the first of equals: the point nearest the start
    if _within_change(adapted_scores, config) and not values[alpha] > adapted_scores[score] + config.margin:
        alpha = 1.0
    if alpha < 1.0:
        model.load_state_dict(interpolated(start_state, params, alpha))
    shown = ", ".join(f"{a:g} {v:.4f}" for a, v in values.items())
    log.info("guard: %s along the line from the start: %s, adapted %.4f (margin %g): sent the point %g", score,
             shown, adapted_scores[score], config.margin, alpha)  # fmt: skip
    return GuardDecision(start_scores, adapted_scores, alpha == 0.0, time.perf_counter() - started, alpha, points)


def _shown(scores: Mapping[str, float], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} {scores[n]:.4f}" if n in scores else f"{n} -" for n in names)
