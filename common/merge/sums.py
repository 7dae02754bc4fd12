"""Weighted running sums of a fixed set of tensors, in one contiguous NumPy buffer.

The merge engine adds one site at a time into these sums, so a server holds the sums
and the update in hand, never a list of models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK", "FlatSums", "Slot", "flat_numpy", "numpy_dtype"]

CHUNK = 1 << 18  # elements per scratch block (1-2 MiB): stays in cache, few enough calls per model
Slot = tuple[str, tuple[int, ...], torch.dtype]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def flat_numpy(t: Tensor) -> np.ndarray:
    """A 1-d NumPy view of a CPU tensor (a copy only if it is not contiguous or NumPy lacks its dtype)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        t = t.to(torch.float32)
    return t.reshape(-1).numpy()


class FlatSums:
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

    def __init__(self, slots: list[Slot], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.slots = slots
        self._np_dtype = numpy_dtype(dtype)
        self._offsets: list[int] = []
        total = 0
        for _, shape, _ in slots:
            self._offsets.append(total)
            total += math.prod(shape)
        self.numel = total
        self._flat: np.ndarray | None = None
        self._views: list[np.ndarray] = []
        self._scratch = np.empty(0, dtype=self._np_dtype)

    def add(self, tensors: Mapping[str, Tensor], weight: float) -> None:
        """sums += weight * tensors in the buffer's dtype: convert, multiply, add, each rounded once."""
        first = self._flat is None
        if first:
            self._flat = np.empty(self.numel, dtype=self._np_dtype)
            spans = zip(self._offsets, self.slots, strict=True)
            self._views = [self._flat[o : o + math.prod(shape)] for o, (_, shape, _) in spans]
        for (key, _, _), acc in zip(self.slots, self._views, strict=True):
            src = flat_numpy(tensors[key])
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
            self._scratch = np.empty(CHUNK, dtype=self._np_dtype)
        for start in range(0, acc.size, CHUNK):
            stop = min(start + CHUNK, acc.size)
            tmp = self._scratch[: stop - start]
            np.copyto(tmp, src[start:stop], casting="unsafe")
            if weight != 1.0:
                np.multiply(tmp, weight, out=tmp)
            np.add(acc[start:stop], tmp, out=acc[start:stop])

    @property
    def nbytes(self) -> int:
        """Memory the sums hold once the first site is in."""
        return self.numel * self._np_dtype.itemsize

    def view(self, index: int) -> np.ndarray:
        """The running sum of one slot, flat, in the sums' dtype (do not modify)."""
        return self._views[index]

    def mean(self, index: int, total: float) -> Tensor:
        """sums / total for one slot, rounded once to float64/32 and once to the slot's dtype."""
        _, shape, dtype = self.slots[index]
        acc = self._views[index]
        if dtype == torch.bfloat16:
            return (torch.from_numpy(acc) / total).to(dtype).reshape(shape)
        out = np.empty(acc.size, dtype=numpy_dtype(dtype))
        np.divide(acc, total, out=out, dtype=self._np_dtype, casting="unsafe")
        return torch.from_numpy(out).reshape(shape)

    def release(self) -> None:
        """Drop the buffer: the result has been written and the memory is wanted back."""
        self._flat, self._views, self._scratch = None, [], np.empty(0, dtype=self._np_dtype)
