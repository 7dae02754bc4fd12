"""Checks a site update must pass before it may touch the merge sums.

A merge is only as good as its worst input: one NaN or one wrongly-shaped tensor would
poison the merged model for every site, so each update is checked whole first and
refused with the site and the tensor named.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from common.bn.stats import BNSums, CountProfile
from common.updates.site import SiteUpdate, bn_layer_names

__all__ = ["UpdateRejected", "template_signature", "validate_sums", "validate_update"]


class UpdateRejected(ValueError):
    """A site update that must not enter the merge."""

    def __init__(self, site: str, tensor: str, reason: str) -> None:
        super().__init__(f"site {site!r}: {tensor}: {reason}")
        self.site, self.tensor, self.reason = site, tensor, reason


def template_signature(state: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _check_keys(update: SiteUpdate, expected: Mapping[str, object]) -> None:
    got = update.state_dict()
    missing = [k for k in expected if k not in got]
    if missing:
        raise UpdateRejected(update.site, repr(missing[0]), f"missing ({len(missing)} tensors missing in all)")
    extra = [k for k in got if k not in expected]
    if extra:
        raise UpdateRejected(update.site, repr(extra[0]), "not in the global model")


def _screen_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(site: str, key: str, value: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(value.shape) != shape:
        raise UpdateRejected(site, repr(key), f"shape {tuple(value.shape)}, the global model has {shape}")
    if value.dtype != dtype:
        raise UpdateRejected(site, repr(key), f"dtype {value.dtype}, the global model has {dtype}")
    # One sum is a cheap screen: it is finite unless a value is NaN/Inf (or the sum overflows, and
    # then the exact count below decides). Summed in the tensor's own precision (at least float32):
    # asking torch for a float64 sum of float32 values is ~20x slower, a multiple of the whole merge.
    if value.is_floating_point() and not bool(torch.isfinite(value.sum(dtype=_screen_dtype(value.dtype)))):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise UpdateRejected(site, repr(key), f"{bad} NaN or Inf values")


def _check_bn(update: SiteUpdate, layer: str, channels: int) -> None:
    var = update.buffers[f"{layer}.running_var"]
    if bool((var < 0).any()):
        raise UpdateRejected(
            update.site, repr(f"{layer}.running_var"), f"negative variance (min {float(var.min()):.3g})"
        )
    if layer not in update.counts:
        raise UpdateRejected(update.site, repr(f"{layer}.num_samples"), "no sample count for this BN layer")
    n = update.counts[layer]
    name = repr(f"{layer}.num_samples")
    if n.is_floating_point() or n.numel() not in (1, channels):
        raise UpdateRejected(update.site, name, f"must be an integer count per channel, got {n.dtype} {tuple(n.shape)}")
    if bool((n <= 0).any()):
        raise UpdateRejected(update.site, name, f"count n = {int(n.min())} (must be > 0)")
    if bool((n != n.reshape(-1)[0]).any()):
        raise UpdateRejected(update.site, name, "counts differ between channels (every channel sees every value)")
    if int(n.reshape(-1)[0]) % update.num_examples:
        raise UpdateRejected(
            update.site,
            name,
            f"{int(n.reshape(-1)[0])} values is not a whole number per image of {update.num_examples}",
        )


def _check_count_profile(update: SiteUpdate, profile: CountProfile) -> None:
    """The architecture relates a site's BN counts to each other and to its number of images.

    A site's share of the first layer's count may differ from the probe's by a factor of
    2 at most (odd image sides round differently); a layer after global pooling sees
    exactly its fixed number of values per image.
    """

    def count(layer: str) -> int:
        return int(update.counts[layer].reshape(-1)[0])

    for layer, per_image in profile.fixed.items():
        if count(layer) != per_image * update.num_examples:
            raise UpdateRejected(
                update.site, repr(f"{layer}.num_samples"),
                f"{count(layer)} values, the architecture gives {per_image} per image x {update.num_examples}",
            )  # fmt: skip
    layers = list(profile.spatial)
    for layer in layers[1:]:
        got, expected = count(layer) / count(layers[0]), profile.spatial[layer]
        if not expected / 2 <= got <= expected * 2:
            raise UpdateRejected(
                update.site, repr(f"{layer}.num_samples"),
                f"{got:.4g} of the first layer's count, the architecture gives about {expected:.4g}",
            )  # fmt: skip


def _check_integer_buffers(update: SiteUpdate) -> None:
    for key, value in update.buffers.items():
        if not value.is_floating_point() and value.numel() and int(value.min()) < 0:
            raise UpdateRejected(update.site, repr(key), f"{int(value.min())} (a count, must be >= 0)")


def validate_update(update: SiteUpdate, template: Mapping[str, Tensor], profile: CountProfile | None = None) -> None:
    """Raise :class:`UpdateRejected` naming the site and tensor at the first problem.

    ``profile`` (``common.bn.stats.bn_count_profile``) also checks the BN counts against
    each other as the architecture relates them.
    """
    if update.num_examples <= 0:
        raise UpdateRejected(update.site, "num_examples", f"{update.num_examples} (must be > 0)")
    signature = template_signature(template)
    _check_keys(update, signature)
    for key, value in update.state_dict().items():
        _check_tensor(update.site, key, value, *signature[key])
    _check_integer_buffers(update)
    for layer in bn_layer_names(template):
        _check_bn(update, layer, template[f"{layer}.running_mean"].numel())
    if profile is not None:
        _check_count_profile(update, profile)


def _check_sum_tensor(site: str, name: str, value: object, channels: int) -> None:
    if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() != channels:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise UpdateRejected(site, name, f"shape {shape}, the layer has {channels} channels")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise UpdateRejected(site, name, "NaN or Inf")


def validate_sums(site: str, sums: Mapping[str, BNSums], layers: Mapping[str, int]) -> None:
    """Check one site's recalibration sums (Σx, Σx², n per channel) for every BN layer in ``layers``."""
    for layer, channels in layers.items():
        if layer not in sums:
            raise UpdateRejected(site, repr(layer), "no BN sums for this layer")
        s = sums[layer]
        for leaf, value in (("sum", s.sum), ("sum_sq", s.sum_sq), ("count", s.count)):
            _check_sum_tensor(site, repr(f"{layer}.{leaf}"), value, channels)
        if s.count.is_floating_point():
            raise UpdateRejected(site, repr(f"{layer}.count"), f"must be integer counts, got {s.count.dtype}")
        if bool((s.count <= 0).any()):
            raise UpdateRejected(site, repr(f"{layer}.count"), f"count n = {int(s.count.min())} (must be > 0)")
        mean = s.sum.double() / s.count.double()
        if bool((s.sum_sq.double() / s.count.double() < mean * mean * (1 - 1e-6) - 1e-12).any()):
            raise UpdateRejected(site, repr(f"{layer}.sum_sq"), "Σx² below (Σx)²/n: a negative variance")
