"""The merge methods' maths: each folds one site's parameters into running sums, then yields the result.

A method sees a site's parameters, its weight and a scale in (0, 1] (the norm clip:
the site's change from the shared start θ₀ is multiplied by it), folds them in, and
drops them. So every method here runs streaming, holding its sums and one site:

- ``linear``: Σ w_i θ_i / Σ w_i.
- ``task-arithmetic``: θ₀ + λ Σ τ_i with τ_i = θ_i - θ₀; the sum of the θ_i is enough.
- ``layerwise``: the linear sums, and one copy of the anchor site's parameters; layer l's
  result is (1 - t_l)·mean + t_l·anchor, t_l rising with the layer's depth.
- ``ties``: each τ_i is trimmed to its own top-k magnitudes (local to that site), and
  only per-sign sums and counts are kept; the elected sign of an entry is the sign of
  the summed trimmed values, and the disjoint mean is that sign's sum over its count,
  so no second pass over the sites is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from common.merge.spec import (
    MERGE_METHODS,
    LayerwiseOptions,
    LinearOptions,
    MergeSpec,
    TaskArithmeticOptions,
    TiesOptions,
)
from common.merge.sums import CHUNK, FlatSums, Slot, flat_numpy

__all__ = ["LayerwiseMerger", "LinearMerger", "ParamMerger", "TaskArithmeticMerger", "TiesMerger", "build_param_merger",
           "kth_largest", "layer_depths"]  # fmt: skip


class ParamMerger(Protocol):
    nbytes: int  # memory of the running sums

    def add(self, params: Mapping[str, Tensor], weight: float, scale: float, site: str = "") -> None: ...

    def value(self, index: int) -> Tensor: ...

    def release(self) -> None: ...


def _chunked(slot: Slot, compute: Callable[[slice], np.ndarray]) -> Tensor:
    """The slot's merged tensor, computed ``CHUNK`` elements at a time into its own dtype.

    Whole-tensor float64 temporaries of the largest layer would cost several times its
    size on top of the sums; chunks keep the extra memory a constant.
    """
    _, shape, dtype = slot
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        span = slice(start, min(start + CHUNK, flat.numel()))
        flat[span] = torch.from_numpy(compute(span))
    return out


class LinearMerger:
    """Σ w_i θ'_i / Σ w_i with θ'_i = θ₀ + s_i (θ_i - θ₀) = s_i θ_i + (1 - s_i) θ₀.

    The sums hold Σ w_i s_i θ_i and a scalar keeps Σ w_i (1 - s_i), the weight of θ₀;
    without clipping that scalar stays 0 and the result is the plain weighted mean.
    """

    def __init__(
        self, slots: list[Slot], base: Mapping[str, Tensor] | None, dtype: torch.dtype, options: LinearOptions
    ) -> None:
        self.slots, self.base = slots, base
        self.sums = FlatSums(slots, dtype)
        self.total = 0.0  # Σ w_i
        self.base_weight = 0.0  # Σ w_i (1 - s_i)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes

    def add(self, params: Mapping[str, Tensor], weight: float, scale: float, site: str = "") -> None:
        self.sums.add(params, weight * scale)
        self.total += weight
        self.base_weight += weight * (1.0 - scale)
        self.count += 1

    def value(self, index: int) -> Tensor:
        if self.base_weight == 0.0:
            return self.sums.mean(index, self.total)
        assert self.base is not None
        acc, base = self.sums.view(index), flat_numpy(self.base[self.slots[index][0]])
        return _chunked(
            self.slots[index], lambda s: (acc[s] + self.base_weight * base[s].astype(np.float64)) / self.total
        )

    def release(self) -> None:
        self.sums.release()


class TaskArithmeticMerger(LinearMerger):
    """θ₀ + λ (Σ θ'_i - K θ₀), from the same sums as the linear merge with unit weights."""

    def __init__(
        self, slots: list[Slot], base: Mapping[str, Tensor] | None, dtype: torch.dtype, options: TaskArithmeticOptions
    ) -> None:
        super().__init__(slots, base, dtype, LinearOptions())
        self.lam = options.lam

    def value(self, index: int) -> Tensor:
        assert self.base is not None
        acc, base = self.sums.view(index), flat_numpy(self.base[self.slots[index][0]])
        k = self.count - self.base_weight

        def compute(s: slice) -> np.ndarray:
            theta0 = base[s].astype(np.float64)
            return theta0 + self.lam * (acc[s] - k * theta0)

        return _chunked(self.slots[index], compute)


def layer_depths(slots: list[Slot]) -> list[float]:
    """Each slot's depth in [0, 1]: its layer's rank (a module, in parameter order) over the last layer's."""
    layers: dict[str, int] = {}
    for key, _, _ in slots:
        layers.setdefault(key.rpartition(".")[0], len(layers))
    last = max(len(layers) - 1, 1)
    return [layers[key.rpartition(".")[0]] / last for key, _, _ in slots]


class LayerwiseMerger(LinearMerger):
    """The linear merge's sums, plus the anchor site's parameters (changed as the norm clip says)."""

    def __init__(
        self, slots: list[Slot], base: Mapping[str, Tensor] | None, dtype: torch.dtype, options: LayerwiseOptions
    ) -> None:
        super().__init__(slots, base, dtype, LinearOptions())
        self.options = options
        self.depths = layer_depths(slots)
        self.anchor: dict[str, np.ndarray] | None = None

    def add(self, params: Mapping[str, Tensor], weight: float, scale: float, site: str = "") -> None:
        super().add(params, weight, scale, site)
        if site != self.options.anchor:
            return
        if self.anchor is not None:
            raise ValueError(f"layerwise: the anchor site {site!r} sent twice")
        self.anchor = {}
        for key, _, _ in self.slots:
            theta = flat_numpy(params[key]).astype(np.float64)
            if scale != 1.0:
                assert self.base is not None  # the engine passes the start whenever the norm clip is on
                theta0 = flat_numpy(self.base[key]).astype(np.float64)
                theta = theta0 + scale * (theta - theta0)
            self.anchor[key] = theta

    def lean(self, index: int) -> float:
        """The anchor's extra share of slot ``index``: 0 before ``start``, ``strength`` at the last layer."""
        depth, o = self.depths[index], self.options
        return o.strength * max(0.0, (depth - o.start) / (1.0 - o.start))

    def value(self, index: int) -> Tensor:
        t = self.lean(index)
        if t == 0.0:
            return super().value(index)
        if self.anchor is None:
            raise ValueError(f"layerwise: the anchor site {self.options.anchor!r} sent no update")
        key = self.slots[index][0]
        acc, anchor = self.sums.view(index), self.anchor[key]
        base = flat_numpy(self.base[key]) if self.base_weight and self.base is not None else None

        def compute(s: slice) -> np.ndarray:
            total = acc[s].astype(np.float64)
            if base is not None:
                total = total + self.base_weight * base[s].astype(np.float64)
            return (1.0 - t) * total / self.total + t * anchor[s]

        return _chunked(self.slots[index], compute)

    def release(self) -> None:
        super().release()
        self.anchor = None


def _abs_task_vector_chunks(
    params: Mapping[str, Tensor], base: Mapping[str, Tensor], slots: list[Slot]
) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        for key, _, _ in slots:
            theta, theta0 = flat_numpy(params[key]), flat_numpy(base[key])
            for start in range(0, theta.size, CHUNK):
                stop = min(start + CHUNK, theta.size)
                yield np.abs(theta[start:stop].astype(np.float64) - theta0[start:stop])

    return chunks


_DIGIT = 16
_COLLECT = 1 << 20  # candidates few enough to sort directly (8 MiB of float64)


def kth_largest(chunks: Callable[[], Iterator[np.ndarray]], k: int) -> float:
    """The k-th largest of non-negative float64 values given as a stream of chunks, exactly.

    A radix select on the bit patterns (which order non-negative floats like their
    values): each pass over the stream histograms the next 16 bits of the values that
    still match the prefix found so far, until the candidates are few enough to sort.
    Memory stays one histogram and one bucket, never a copy of the stream.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    prefix, shift, remaining = 0, 64, k
    while True:
        shift -= _DIGIT
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        for chunk in chunks():
            bits = chunk.view(np.uint64)
            if shift + _DIGIT < 64:
                bits = bits[(bits >> np.uint64(shift + _DIGIT)) == np.uint64(prefix)]
            hist += np.bincount(
                ((bits >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << _DIGIT
            )
        above = np.cumsum(hist[::-1])  # above[j]: values with digit >= (65535 - j)
        if above[-1] < remaining:
            raise ValueError(f"k = {k} exceeds the number of values")
        j = int(np.searchsorted(above, remaining))
        digit = (1 << _DIGIT) - 1 - j
        remaining -= int(above[j - 1]) if j > 0 else 0
        prefix = (prefix << _DIGIT) | digit
        if shift == 0:
            return float(np.array([prefix], dtype=np.uint64).view(np.float64)[0])
        if hist[digit] <= _COLLECT:
            return _select_in_bucket(chunks, prefix, shift, remaining)


def _select_in_bucket(chunks: Callable[[], Iterator[np.ndarray]], prefix: int, shift: int, remaining: int) -> float:
    parts = [c[(c.view(np.uint64) >> np.uint64(shift)) == np.uint64(prefix)] for c in chunks()]
    bucket = np.concatenate(parts) if parts else np.empty(0)
    return float(np.partition(bucket, bucket.size - remaining)[bucket.size - remaining])


class TiesMerger:
    """Streaming TIES: per-sign sums and counts of each site's trimmed task vector."""

    def __init__(
        self, slots: list[Slot], base: Mapping[str, Tensor] | None, dtype: torch.dtype, options: TiesOptions
    ) -> None:
        assert base is not None  # the sums are float64 whatever ``dtype``: signs and counts need the exact values
        self.slots, self.base, self.options = slots, base, options
        self.numel = sum(int(np.prod(shape)) for _, shape, _ in slots)
        self.offsets = np.cumsum([0] + [int(np.prod(shape)) for _, shape, _ in slots]).tolist()
        self.pos = np.zeros(self.numel, dtype=np.float64)
        self.neg = np.zeros(self.numel, dtype=np.float64)
        self.n_pos = np.zeros(self.numel, dtype=np.uint16)
        self.n_neg = np.zeros(self.numel, dtype=np.uint16)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.pos, self.neg, self.n_pos, self.n_neg))

    def add(self, params: Mapping[str, Tensor], weight: float, scale: float, site: str = "") -> None:
        if self.count >= np.iinfo(np.uint16).max:
            raise ValueError("ties: at most 65535 sites can be merged")
        chunks = _abs_task_vector_chunks(params, self.base, self.slots)
        n_keep = max(1, round(self.options.k * self.numel))
        threshold = 0.0 if n_keep >= self.numel else kth_largest(chunks, n_keep)
        for (key, _, _), offset in zip(self.slots, self.offsets, strict=False):
            theta, theta0 = flat_numpy(params[key]), flat_numpy(self.base[key])
            for start in range(0, theta.size, CHUNK):
                stop = min(start + CHUNK, theta.size)
                tau = theta[start:stop].astype(np.float64) - theta0[start:stop]
                keep = np.abs(tau) >= threshold
                if scale != 1.0:
                    tau *= scale
                span = slice(offset + start, offset + stop)
                up, down = keep & (tau > 0), keep & (tau < 0)
                self.pos[span] += np.where(up, tau, 0.0)
                self.neg[span] += np.where(down, tau, 0.0)
                self.n_pos[span] += up
                self.n_neg[span] += down
        self.count += 1

    def value(self, index: int) -> Tensor:
        offset, slot = self.offsets[index], self.slots[index]
        base = flat_numpy(self.base[slot[0]])

        def compute(s: slice) -> np.ndarray:
            span = slice(offset + s.start, offset + s.stop)
            pos, neg = self.pos[span], self.neg[span]
            total = pos + neg
            up = pos / np.maximum(self.n_pos[span], 1)
            down = neg / np.maximum(self.n_neg[span], 1)
            mean = np.where(total > 0, up, np.where(total < 0, down, 0.0))
            return base[s].astype(np.float64) + self.options.lam * mean

        return _chunked(slot, compute)

    def release(self) -> None:
        self.pos = self.neg = np.empty(0)
        self.n_pos = self.n_neg = np.empty(0, dtype=np.uint16)


def build_param_merger(spec: MergeSpec, slots: list[Slot], base: Mapping[str, Tensor] | None) -> ParamMerger:
    """The registered method's merger (``common.merge.spec.MERGE_METHODS``) over these slots."""
    if spec.needs_base and base is None:
        raise ValueError(f"merge method {spec.method!r} needs the shared starting model")
    dtype = torch.float64 if spec.precision == "float64" else torch.float32
    return MERGE_METHODS.get(spec.method).load()(slots, base, dtype, spec.options)
