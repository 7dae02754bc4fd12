"""Training-free merging of site models: pure functions on name-keyed tensors.

Parameters merge linearly. BN buffers merge as Gaussians: a site's (mean, variance,
n) is a summary of n values, and pooling the sums n·μ and n·(σ²+μ²) gives exactly the
statistics of the union of every site's values. The merge is written as an
accumulator fed one site at a time, so a server never holds more than the running sums
and the update in hand. Parameter sums live in one contiguous buffer (float64 by default,
exact; float32 on request, half the memory and traffic); BN sums are always float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BN_BUFFER_SUFFIXES",
    "BUFFER_MODES",
    "PARAM_DTYPES",
    "PARAM_PRECISIONS",
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


PARAM_PRECISIONS = {"float64": torch.float64, "float32": torch.float32}  # run-config name -> dtype of the sums
PARAM_DTYPES = tuple(PARAM_PRECISIONS.values())
_CHUNK = 1 << 18  # elements per scratch block (1-2 MiB): stays in cache, few enough calls per model


def _f64(t: Tensor) -> Tensor:
    """A float64 copy that is safe to modify in place."""
    return t.detach().to(torch.float64, copy=True)


def _flat_numpy(t: Tensor) -> np.ndarray:
    """A 1-d NumPy view of a CPU tensor (a copy only if it is not contiguous or NumPy lacks its dtype)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        t = t.to(torch.float32)
    return t.reshape(-1).numpy()


class _FlatSums:
    """Weighted running sums of a fixed set of tensors, in one contiguous buffer.

    One buffer instead of one tensor per key keeps the sums in a single allocation and
    lets the first site be copied in rather than added to zeros. A site is added
    straight from its own memory: one NumPy add per tensor when no conversion is needed,
    otherwise block by block through a small scratch that stays in cache (convert,
    scale, add), which is nearly twice as fast as NumPy's own casting loop and never
    makes a float64 copy of the update. Buffers come from NumPy, which asks the kernel
    for huge pages: first-touching a torch allocation of a model's size costs several
    times a pass over it in 4 KiB page faults.
    """

    def __init__(self, slots: list[tuple[str, tuple[int, ...], torch.dtype]], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.slots = slots
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._offsets: list[int] = []
        total = 0
        for _, shape, _ in slots:
            self._offsets.append(total)
            total += math.prod(shape)
        self.numel = total
        self._flat: np.ndarray | None = None
        self._views: list[np.ndarray] = []
        self._scratch = np.empty(0, dtype=self._np_dtype)

    def check(self, tensors: Mapping[str, Tensor], site: str) -> None:
        """Refuse, before any sum changes, a site whose tensors do not fit the layout."""
        for key, shape, _ in self.slots:
            if key not in tensors:
                raise KeyError(f"site {site!r} lacks {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"site {site!r}: {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")

    def add(self, tensors: Mapping[str, Tensor], weight: float) -> None:
        """sums += weight * tensors in the buffer's dtype: convert, multiply, add, each rounded once."""
        first = self._flat is None
        if first:
            self._flat = np.empty(self.numel, dtype=self._np_dtype)
            spans = zip(self._offsets, self.slots, strict=True)
            self._views = [self._flat[o : o + math.prod(shape)] for o, (_, shape, _) in spans]
        for (key, _, _), acc in zip(self.slots, self._views, strict=True):
            src = _flat_numpy(tensors[key])
            if first:
                np.copyto(acc, src, casting="unsafe")
                if weight != 1.0:
                    np.multiply(acc, weight, out=acc)
            elif weight == 1.0 and src.dtype == self._np_dtype:
                np.add(acc, src, out=acc)
            else:
                self._add_blocks(acc, src, weight)

    def _add_blocks(self, acc: np.ndarray, src: np.ndarray, weight: float) -> None:
        if self._scratch.size == 0:
            self._scratch = np.empty(_CHUNK, dtype=self._np_dtype)
        for start in range(0, acc.size, _CHUNK):
            stop = min(start + _CHUNK, acc.size)
            tmp = self._scratch[: stop - start]
            np.copyto(tmp, src[start:stop], casting="unsafe")
            if weight != 1.0:
                np.multiply(tmp, weight, out=tmp)
            np.add(acc[start:stop], tmp, out=acc[start:stop])

    def mean(self, index: int, total: float) -> Tensor:
        """sums / total for one slot, rounded once to float64/32 and once to the template's dtype."""
        _, shape, dtype = self.slots[index]
        acc = self._views[index]
        if dtype == torch.bfloat16:
            return (torch.from_numpy(acc) / total).to(dtype).reshape(shape)
        out = np.empty(acc.size, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        np.divide(acc, total, out=out, dtype=self._np_dtype, casting="unsafe")
        return torch.from_numpy(out).reshape(shape)


class MergeAccumulator:
    """Running weighted sums; ``add`` one site at a time, then ``result``.

    ``param_weighting``: ``uniform`` (1 per site), ``counts`` (the site's number of
    examples) or ``explicit`` (the ``weight`` given to ``add``).
    ``buffer_mode``: ``gaussian`` (n = values per channel), ``reference`` (n =
    ``num_batches_tracked``, the published code's rule), ``average`` (buffers averaged
    like parameters) or ``first`` (keep the first site's buffers).
    ``param_dtype``: the precision of the parameter sums. ``float64`` (default): a
    float32 value times an integer weight is exact in float64, and so is the sum of K of
    them whenever it needs at most 53 significant bits, e.g. with uniform weights when an
    element's values differ in magnitude by less than 2^(29 - ceil(log2 K)); exact sums
    do not depend on the order of the sites, so the merge is bit-identical in any
    arrival order. It holds two models' worth of sums. ``float32``: one model's worth and
    half the bytes moved per site, but every addition rounds, so the last bits depend on
    the arrival order (error at most (K-1) * 2^-24 of the sum of magnitudes). BN
    statistics are pooled in float64 either way: E[x^2] - mu^2 cancels.
    """

    def __init__(
        self,
        template: Mapping[str, Tensor],
        param_weighting: str = "uniform",
        buffer_mode: str = "gaussian",
        equal_site_stats: bool = False,
        param_dtype: torch.dtype = torch.float64,
    ) -> None:
        if param_weighting not in ("uniform", "counts", "explicit"):
            raise ValueError(f"param_weighting must be uniform, counts or explicit, not {param_weighting!r}")
        if buffer_mode not in BUFFER_MODES:
            raise ValueError(f"buffer mode must be one of {', '.join(BUFFER_MODES)}, not {buffer_mode!r}")
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be torch.float64 or torch.float32, not {param_dtype}")
        self.param_weighting = param_weighting
        self.buffer_mode = buffer_mode
        self.equal_site_stats = equal_site_stats
        self._template = {k: (tuple(v.shape), v.dtype) for k, v in template.items()}
        self.layers = bn_layer_names(template)
        self._channels = [template[f"{layer}.running_mean"].numel() for layer in self.layers]
        self.sites: list[str] = []
        self._weight_total = 0.0
        params, buffers = split_state(template)
        linear = list(params)
        if buffer_mode == "average":
            linear += [k for k in buffers if not k.endswith(".num_batches_tracked")]
        self._linear = _FlatSums([(k, *self._template[k]) for k in linear], param_dtype)
        self._from_buffers = frozenset(linear) - frozenset(params)
        self._nbt_keys = [f"{layer}.num_batches_tracked" for layer in self.layers]
        self._nbt_keys = [k for k in self._nbt_keys if k in template]
        self._first_buffers: dict[str, Tensor] = {}
        self._n: Tensor | None = None  # float64 [Σ channels], BN layers one after another
        self._s1: Tensor | None = None
        self._s2: Tensor | None = None
        self._nbt: dict[str, Tensor] = {}

    @property
    def param_dtype(self) -> torch.dtype:
        return self._linear.dtype

    def _site_weight(self, update: SiteUpdate, weight: float | None) -> float:
        if self.param_weighting == "explicit":
            if weight is None or not weight > 0:
                raise ValueError(f"site {update.site!r}: explicit weighting needs a positive weight, got {weight}")
            return float(weight)
        if self.param_weighting == "counts":
            return float(update.num_examples)
        return 1.0

    def _linear_inputs(self, update: SiteUpdate) -> Mapping[str, Tensor]:
        if not self._from_buffers:
            return update.params
        return {**update.params, **{k: update.buffers[k] for k in self._from_buffers if k in update.buffers}}

    def add(self, update: SiteUpdate, weight: float | None = None) -> None:
        """Fold one (already validated) site into the sums; a site that does not fit changes nothing."""
        w = self._site_weight(update, weight)
        linear = self._linear_inputs(update)
        self._linear.check(linear, update.site)
        bn = self._gaussian_terms(update) if self.buffer_mode in ("gaussian", "reference") else None
        self._linear.add(linear, w)
        if bn is not None:
            self._add_gaussian(*bn)
        if self.buffer_mode == "first" and not self.sites:
            self._first_buffers = {k: v.detach().clone() for k, v in update.buffers.items()}
        for key in self._nbt_keys:
            if key in update.buffers:
                value = update.buffers[key].detach().to(torch.int64)
                self._nbt[key] = self._nbt[key] + value if key in self._nbt else value.clone()
        self._weight_total += w
        self.sites.append(update.site)

    def _layer_count(self, update: SiteUpdate, layer: str, channels: int) -> Tensor:
        if self.equal_site_stats:
            return torch.ones(channels, dtype=torch.float64)
        n = update.buffers[f"{layer}.num_batches_tracked"] if self.buffer_mode == "reference" else update.counts[layer]
        return _f64(n).expand(channels)

    def _gaussian_terms(self, update: SiteUpdate) -> tuple[Tensor, Tensor, Tensor]:
        """One site's (n, n·μ, n·(σ²+μ²)) for every BN channel at once, in float64."""
        if not self.layers:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty, empty
        buffers = update.buffers
        mean = torch.cat([buffers[f"{layer}.running_mean"].detach().reshape(-1) for layer in self.layers])
        var = torch.cat([buffers[f"{layer}.running_var"].detach().reshape(-1) for layer in self.layers])
        mean, var = mean.to(torch.float64), var.to(torch.float64)
        if mean.numel() != sum(self._channels) or var.numel() != mean.numel():
            raise ValueError(f"site {update.site!r}: BN buffers do not match the template's channels")
        n = torch.cat(
            [self._layer_count(update, layer, c) for layer, c in zip(self.layers, self._channels, strict=True)]
        )
        return n, n * mean, n * (var + mean * mean)

    def _add_gaussian(self, n: Tensor, s1: Tensor, s2: Tensor) -> None:
        if self._n is None:
            self._n, self._s1, self._s2 = n, s1, s2
        else:
            self._n.add_(n)
            self._s1.add_(s1)
            self._s2.add_(s2)

    def _per_layer(self, flat: Tensor) -> list[Tensor]:
        return list(flat.split(self._channels))

    def _merged_buffers(self) -> dict[str, Tensor]:
        if self.buffer_mode == "first":
            return {k: v.clone() for k, v in self._first_buffers.items()}
        out: dict[str, Tensor] = {}
        if self.buffer_mode in ("gaussian", "reference") and self._n is not None:
            mean = self._s1 / self._n
            var = (self._s2 / self._n - mean * mean).clamp_min(0.0)
            for layer, m, v in zip(self.layers, self._per_layer(mean), self._per_layer(var), strict=True):
                out[f"{layer}.running_mean"] = m
                out[f"{layer}.running_var"] = v
        out.update(self._nbt)
        return out

    def iter_result(self) -> Iterator[tuple[str, Tensor]]:
        """The merged state dict one tensor at a time, in the template's order and dtypes.

        A caller that serialises each tensor and drops it (the server) never holds a
        second full model beside the sums.
        """
        if not self.sites:
            raise ValueError("nothing to merge: no site update was accepted")
        buffers = self._merged_buffers()
        index = {key: i for i, (key, _, _) in enumerate(self._linear.slots)}
        for key, (shape, dtype) in self._template.items():
            if key in index:
                yield key, self._linear.mean(index[key], self._weight_total)
            elif key in buffers:
                yield key, buffers[key].to(dtype).reshape(shape)
            else:
                raise KeyError(f"merged model lacks {key!r}")

    def result(self) -> dict[str, Tensor]:
        """The merged state dict, in the template's dtypes."""
        return dict(self.iter_result())

    def merged_counts(self) -> dict[str, Tensor]:
        """Values per channel behind the merged statistics (for gaussian pooling)."""
        if self._n is None:
            return {}
        return {
            layer: n.round().to(torch.int64) for layer, n in zip(self.layers, self._per_layer(self._n), strict=True)
        }


def merge_updates(
    template: Mapping[str, Tensor],
    updates: Iterable[SiteUpdate],
    param_weighting: str = "uniform",
    buffer_mode: str = "gaussian",
    weights: list[float] | None = None,
    *,
    param_dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """All-at-once convenience over :class:`MergeAccumulator`."""
    acc = MergeAccumulator(template, param_weighting, buffer_mode, param_dtype=param_dtype)
    for i, update in enumerate(updates):
        acc.add(update, None if weights is None else weights[i])
    return acc.result()
