"""Training-free merging of site models: pure functions on name-keyed tensors.

Parameters merge linearly. BN buffers merge as Gaussians: a site's (mean, variance,
n) is a summary of n values, and pooling the sums n·μ and n·(σ²+μ²) gives exactly the
statistics of the union of every site's values. The merge is written as an
accumulator fed one site at a time, in float64, so a server never holds more than the
running sums and the update in hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BN_BUFFER_SUFFIXES",
    "BUFFER_MODES",
    "MergeAccumulator",
    "SiteUpdate",
    "bn_layer_names",
    "merge_updates",
    "split_state",
]

BUFFER_MODES = ("gaussian", "reference", "average", "first")
BN_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def bn_layer_names(state: Mapping[str, Tensor]) -> list[str]:
    """BN layers in a state dict, found by their ``running_mean`` buffer."""
    return [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (parameters, BN buffers)."""
    layers = set(bn_layer_names(state))
    params, buffers = {}, {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        is_buffer = layer in layers and f".{leaf}" in BN_BUFFER_SUFFIXES
        (buffers if is_buffer else params)[key] = value
    return params, buffers


@dataclass
class SiteUpdate:
    """What one site sends: parameters, BN buffers, and the counts behind the buffers."""

    site: str
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    counts: dict[str, Tensor]  # BN layer -> int64 [C]: values per channel behind its statistics
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.params, **self.buffers}


def _f64(t: Tensor) -> Tensor:
    """A float64 copy that is safe to modify in place."""
    return t.detach().to(torch.float64, copy=True)


class MergeAccumulator:
    """Running weighted sums; ``add`` one site at a time, then ``result``.

    ``param_weighting``: ``uniform`` (1 per site), ``counts`` (the site's number of
    examples) or ``explicit`` (the ``weight`` given to ``add``).
    ``buffer_mode``: ``gaussian`` (n = values per channel), ``reference`` (n =
    ``num_batches_tracked``, the published code's rule), ``average`` (buffers averaged
    like parameters) or ``first`` (keep the first site's buffers).
    """

    def __init__(
        self,
        template: Mapping[str, Tensor],
        param_weighting: str = "uniform",
        buffer_mode: str = "gaussian",
        equal_site_stats: bool = False,
    ) -> None:
        if param_weighting not in ("uniform", "counts", "explicit"):
            raise ValueError(f"param_weighting must be uniform, counts or explicit, not {param_weighting!r}")
        if buffer_mode not in BUFFER_MODES:
            raise ValueError(f"buffer mode must be one of {', '.join(BUFFER_MODES)}, not {buffer_mode!r}")
        self.param_weighting = param_weighting
        self.buffer_mode = buffer_mode
        self.equal_site_stats = equal_site_stats
        self._template = {k: (tuple(v.shape), v.dtype) for k, v in template.items()}
        self.layers = bn_layer_names(template)
        self.sites: list[str] = []
        self._weight_total = 0.0
        self._param_sums: dict[str, Tensor] = {}
        self._first_buffers: dict[str, Tensor] = {}
        self._n: dict[str, Tensor] = {}
        self._s1: dict[str, Tensor] = {}
        self._s2: dict[str, Tensor] = {}
        self._nbt: dict[str, Tensor] = {}

    def _site_weight(self, update: SiteUpdate, weight: float | None) -> float:
        if self.param_weighting == "explicit":
            if weight is None or not weight > 0:
                raise ValueError(f"site {update.site!r}: explicit weighting needs a positive weight, got {weight}")
            return float(weight)
        if self.param_weighting == "counts":
            return float(update.num_examples)
        return 1.0

    @staticmethod
    def _accumulate(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
        if key in sums:
            sums[key].add_(value)
        else:
            sums[key] = value

    def add(self, update: SiteUpdate, weight: float | None = None) -> None:
        """Fold one (already validated) site into the sums."""
        w = self._site_weight(update, weight)
        linear = dict(update.params)
        if self.buffer_mode == "average":
            linear.update({k: v for k, v in update.buffers.items() if not k.endswith(".num_batches_tracked")})
        for key, value in linear.items():
            self._accumulate(self._param_sums, key, _f64(value).mul_(w))
        if self.buffer_mode in ("gaussian", "reference"):
            self._add_gaussian(update)
        if self.buffer_mode == "first" and not self.sites:
            self._first_buffers = {k: v.detach().clone() for k, v in update.buffers.items()}
        for layer in self.layers:
            key = f"{layer}.num_batches_tracked"
            if key in update.buffers:
                self._accumulate(self._nbt, key, update.buffers[key].detach().to(torch.int64).clone())
        self._weight_total += w
        self.sites.append(update.site)

    def _layer_count(self, update: SiteUpdate, layer: str, channels: int) -> Tensor:
        if self.equal_site_stats:
            return torch.ones(channels, dtype=torch.float64)
        n = update.buffers[f"{layer}.num_batches_tracked"] if self.buffer_mode == "reference" else update.counts[layer]
        return _f64(n).expand(channels)

    def _add_gaussian(self, update: SiteUpdate) -> None:
        for layer in self.layers:
            mean = _f64(update.buffers[f"{layer}.running_mean"])
            var = _f64(update.buffers[f"{layer}.running_var"])
            n = self._layer_count(update, layer, mean.numel())
            self._accumulate(self._n, layer, n.clone())
            self._accumulate(self._s1, layer, n * mean)
            self._accumulate(self._s2, layer, n * (var + mean * mean))

    def _merged_buffers(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.buffer_mode == "first":
            return {k: v.clone() for k, v in self._first_buffers.items()}
        for layer in self.layers:
            for leaf in ("running_mean", "running_var"):
                key = f"{layer}.{leaf}"
                if self.buffer_mode == "average":
                    out[key] = self._param_sums[key] / self._weight_total
            if self.buffer_mode in ("gaussian", "reference"):
                mean = self._s1[layer] / self._n[layer]
                out[f"{layer}.running_mean"] = mean
                out[f"{layer}.running_var"] = (self._s2[layer] / self._n[layer] - mean * mean).clamp_min(0.0)
            key = f"{layer}.num_batches_tracked"
            if key in self._nbt:
                out[key] = self._nbt[key]
        return out

    def result(self) -> dict[str, Tensor]:
        """The merged state dict, in the template's dtypes."""
        if not self.sites:
            raise ValueError("nothing to merge: no site update was accepted")
        merged = {k: v / self._weight_total for k, v in self._param_sums.items()}
        merged.update(self._merged_buffers())
        out = {}
        for key, (shape, dtype) in self._template.items():
            if key not in merged:
                raise KeyError(f"merged model lacks {key!r}")
            out[key] = merged[key].to(dtype).reshape(shape)
        return out

    def merged_counts(self) -> dict[str, Tensor]:
        """Values per channel behind the merged statistics (for gaussian pooling)."""
        return {layer: n.round().to(torch.int64) for layer, n in self._n.items()}


def merge_updates(
    template: Mapping[str, Tensor],
    updates: Iterable[SiteUpdate],
    param_weighting: str = "uniform",
    buffer_mode: str = "gaussian",
    weights: list[float] | None = None,
) -> dict[str, Tensor]:
    """All-at-once convenience over :class:`MergeAccumulator`."""
    acc = MergeAccumulator(template, param_weighting, buffer_mode)
    for i, update in enumerate(updates):
        acc.add(update, None if weights is None else weights[i])
    return acc.result()
