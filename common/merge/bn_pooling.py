"""Merging BatchNorm statistics: each site's per-channel moments, pooled once at the end.

A site's (n, μ, σ²) per channel summarises n values; pooling the first and second
moments with weights n gives exactly the mean and variance of the union of every site's
values (the Gaussian merge). The same pooling serves the recalibration round, whose
sites send Σx, Σx², n measured under the merged parameters.

The per-site terms are a few numbers per channel, so they are kept until the end
rather than summed on arrival. That allows two things a running sum cannot: a cap on
any one site's share of the weight, applied after every claim is in; and a combination
in a canonical order, so the pooled statistics are bit-identical however the replies
arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.bn.stats import BNSums
from common.updates.site import SiteUpdate, bn_layer_names
from common.updates.validation import UpdateRejected

__all__ = ["BufferMerger", "MomentPool", "SiteMoments", "capped_shares", "moments_of_sums", "statistics_buffers"]


def capped_shares(weights: np.ndarray, cap: float) -> np.ndarray:
    """Shares proportional to ``weights`` along axis 0, none above ``cap`` (raised to 1/K if below).

    Water-filling: a share over the cap is fixed at the cap and the mass it loses goes
    to the others in proportion to their weights, until no share exceeds the cap.
    """
    k = weights.shape[0]
    cap = max(cap, 1.0 / k)
    shares = weights / weights.sum(0)
    if cap >= 1.0:
        return shares
    fixed = np.zeros(shares.shape, dtype=bool)
    for _ in range(k):
        over = (shares > cap) & ~fixed
        if not over.any():
            break
        fixed |= over
        free_mass = 1.0 - cap * fixed.sum(0)
        free_weight = np.where(fixed, 0.0, weights).sum(0)
        scale = np.divide(free_mass, free_weight, out=np.zeros_like(free_mass, dtype=np.float64), where=free_weight > 0)
        shares = np.where(fixed, cap, weights * scale)
    return shares


@dataclass(frozen=True)
class SiteMoments:
    """One site's weight, mean and second moment for every BN channel (layers one after another)."""

    weight: np.ndarray
    mean: np.ndarray
    second: np.ndarray  # E[x²] when pooled as Gaussians, the variance when averaged linearly

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (self.weight, self.mean, self.second):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.digest()


class MomentPool:
    """Per-site moments, combined in a canonical order with capped shares."""

    def __init__(self, gaussian: bool, max_share: float) -> None:
        self.gaussian, self.max_share = gaussian, max_share
        self.entries: list[tuple[str, bytes, SiteMoments]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, site: str, moments: SiteMoments) -> None:
        self.entries.append((site, moments.digest(), moments))

    def _ordered(self) -> list[tuple[str, bytes, SiteMoments]]:
        return sorted(self.entries, key=lambda e: (e[0], e[1]))

    def per_site(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Each site's own (mean, variance) per channel, in the canonical order: a bank's entries."""
        out = []
        for site, _, m in self._ordered():
            var = m.second - m.mean * m.mean if self.gaussian else m.second
            out.append((site, m.mean, np.maximum(var, 0.0)))
        return out

    def combine(self) -> tuple[np.ndarray, np.ndarray]:
        """Pooled (mean, variance) per channel."""
        if not self.entries:
            raise ValueError("no BN statistics to pool")
        ordered = [m for _, _, m in self._ordered()]
        shares = capped_shares(np.stack([m.weight for m in ordered]), self.max_share)
        mean = (shares * np.stack([m.mean for m in ordered])).sum(0)
        second = (shares * np.stack([m.second for m in ordered])).sum(0)
        var = second - mean * mean if self.gaussian else second
        return mean, np.maximum(var, 0.0)


def _cat(tensors: list[Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).numpy()


def moments_of_sums(sums: Mapping[str, BNSums], layers: list[str], equal: bool) -> SiteMoments:
    """A recalibration reply's sums as moments; ``equal`` gives the site weight 1 in every channel."""
    count = _cat([sums[layer].count for layer in layers])
    mean = _cat([sums[layer].sum for layer in layers]) / count
    second = _cat([sums[layer].sum_sq for layer in layers]) / count
    return SiteMoments(np.ones_like(count) if equal else count, mean, second)


def statistics_buffers(
    template: Mapping[str, Tensor], layers: list[str], mean: np.ndarray, var: np.ndarray
) -> dict[str, Tensor]:
    """Flat per-channel statistics as ``running_mean``/``running_var`` tensors in the template's dtypes."""
    out: dict[str, Tensor] = {}
    offset = 0
    for layer in layers:
        ref = template[f"{layer}.running_mean"]
        span = slice(offset, offset + ref.numel())
        for leaf, values in (("running_mean", mean), ("running_var", var)):
            key = f"{layer}.{leaf}"
            out[key] = torch.from_numpy(values[span].copy()).to(template[key].dtype).reshape(template[key].shape)
        offset += ref.numel()
    return out


class BufferMerger:
    """The BN buffers of the merge, by ``mode``: gaussian, reference, average or first."""

    def __init__(self, template: Mapping[str, Tensor], mode: str, equal_site_stats: bool, max_share: float) -> None:
        self.template = template
        self.mode, self.equal = mode, equal_site_stats
        self.layers = bn_layer_names(template)
        self.channels = [template[f"{layer}.running_mean"].numel() for layer in self.layers]
        self.pool = MomentPool(gaussian=mode != "average", max_share=max_share)
        self.nbt_keys = [k for k in (f"{layer}.num_batches_tracked" for layer in self.layers) if k in template]
        self.nbt: dict[str, Tensor] = {}
        self.first: dict[str, Tensor] = {}

    def moments(self, update: SiteUpdate, weight: float) -> SiteMoments | None:
        """The site's terms, computed (and checked) before anything is added."""
        if self.mode == "first" or not self.layers:
            return None
        buffers = update.buffers
        mean = _cat([buffers[f"{layer}.running_mean"] for layer in self.layers])
        var = _cat([buffers[f"{layer}.running_var"] for layer in self.layers])
        if mean.size != sum(self.channels) or var.size != mean.size:
            raise ValueError(f"site {update.site!r}: BN buffers do not match the template's channels")
        if self.mode == "average":
            return SiteMoments(np.full(mean.size, weight), mean, var)
        if self.equal:
            n = np.ones(mean.size)
        elif self.mode == "reference":
            n = np.repeat(self._batches_tracked(update), self.channels)
        else:
            n = _cat([update.counts[layer].expand(c) for layer, c in zip(self.layers, self.channels, strict=True)])
        return SiteMoments(n, mean, var + mean * mean)

    def _batches_tracked(self, update: SiteUpdate) -> list[float]:
        """The published rule's n: a count of training batches, which must be positive to weigh anything."""
        out = []
        for layer in self.layers:
            key = f"{layer}.num_batches_tracked"
            n = int(update.buffers[key]) if key in update.buffers else 0
            if n <= 0:
                raise UpdateRejected(update.site, repr(key), f"{n}: buffer-mode reference needs a count > 0")
            out.append(float(n))
        return out

    def add(self, update: SiteUpdate, moments: SiteMoments | None) -> None:
        if moments is not None:
            self.pool.add(update.site, moments)
        if self.mode == "first" and not self.first:
            self.first = {k: v.detach().clone() for k, v in update.buffers.items()}
        for key in self.nbt_keys:
            value = update.buffers[key].detach().to(torch.int64)
            self.nbt[key] = self.nbt[key] + value if key in self.nbt else value.clone()

    def merged(self) -> dict[str, Tensor]:
        if self.mode == "first":
            return {k: v.clone() for k, v in self.first.items()}
        out = dict(self.nbt)
        if len(self.pool):
            out.update(statistics_buffers(self.template, self.layers, *self.pool.combine()))
        return out
