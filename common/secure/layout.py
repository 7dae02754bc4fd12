"""The merge as one secure sum: what each site's vector holds, the agreed bounds, and the decoding.

A site's vector is its weight w times each parameter tensor, w times each BN layer's mean
and second moment (E[x²] = σ² + μ²), and its ``num_batches_tracked``; summed over sites
and divided by the known Σ w it gives the linear merge and the Gaussian pooling of the
statistics (var = E[x²] - μ²) without the server seeing any one site. The recalibration
round sums the same moments measured under the merged parameters.

Bounds are declared from the shared starting model, which both sides hold, before any
masking: 2^10 times a tensor's largest initial magnitude (rounded up to a power of 2)
for parameters, 2^12 for BN moments. An honest adaptation stays far inside them; a site
whose values do not is refused before it masks anything. The variance is a difference
of two decoded sums, so its error is at most the second moment's error plus twice the
mean's magnitude times the mean's error (both from ``SecureLayout.error_bound``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from common.secure.secagg import SecureLayout
from common.updates.site import SiteUpdate, bn_layer_names, split_state

__all__ = ["decode_merge", "decode_statistics", "merge_layout", "merge_segments", "statistics_layout",
           "statistics_segments"]  # fmt: skip

PARAM_MARGIN_BITS = 10
MOMENT_MARGIN_BITS = 12


def _power_of_two_above(value: float, margin_bits: int) -> float:
    return 2.0 ** (math.ceil(math.log2(max(value, 1e-2))) + margin_bits)


def _moment_bounds(template: Mapping[str, Tensor], layer: str) -> tuple[float, float]:
    mean = template[f"{layer}.running_mean"].double()
    var = template[f"{layer}.running_var"].double()
    spread = float((mean.abs() + 4 * var.clamp_min(0).sqrt()).max()) if mean.numel() else 1.0
    second = float((var + mean * mean).max()) if mean.numel() else 1.0
    return _power_of_two_above(spread, MOMENT_MARGIN_BITS), _power_of_two_above(second, MOMENT_MARGIN_BITS)


def merge_layout(template: Mapping[str, Tensor], sites: int) -> SecureLayout:
    """The first round's vector: parameters, then each BN layer's mean and second moment, then the batch counts."""
    params, _ = split_state(template)
    names, sizes, bounds = [], [], []
    for key, value in params.items():
        names.append(key)
        sizes.append(value.numel())
        bounds.append(_power_of_two_above(float(value.double().abs().max()) if value.numel() else 1.0,
                                          PARAM_MARGIN_BITS))  # fmt: skip
    statistics = statistics_layout(template, sites)
    names += list(statistics.names)
    sizes += list(statistics.sizes)
    bounds += [statistics.room / s for s in statistics.scales]
    layers = bn_layer_names(template)
    names.append("num_batches_tracked")
    sizes.append(len(layers))
    bounds.append(2.0**40)
    return SecureLayout.from_bounds(names, sizes, bounds, sites)


def statistics_layout(template: Mapping[str, Tensor], sites: int) -> SecureLayout:
    """The recalibration round's vector: each BN layer's mean and second moment."""
    names, sizes, bounds = [], [], []
    for layer in bn_layer_names(template):
        channels = template[f"{layer}.running_mean"].numel()
        mean_bound, second_bound = _moment_bounds(template, layer)
        names += [f"{layer}.mean", f"{layer}.second"]
        sizes += [channels, channels]
        bounds += [mean_bound, second_bound]
    return SecureLayout.from_bounds(names, sizes, bounds, sites)


def statistics_segments(
    means: Mapping[str, Tensor], seconds: Mapping[str, Tensor], layers: list[str], weight: float
) -> list[np.ndarray]:
    out = []
    for layer in layers:
        out += [weight * means[layer].double().numpy(), weight * seconds[layer].double().numpy()]
    return out


def merge_segments(
    update: SiteUpdate, template: Mapping[str, Tensor], param_weight: float, stats_weight: float
) -> list[np.ndarray]:
    """One site's vector for the first round, segment by segment, in ``merge_layout``'s order.

    The parameters carry ``param_weight`` (1, or the site's share of the images), the
    statistics ``stats_weight`` (its share of the images, or 1 with equal-site-stats).
    """
    params, _ = split_state(template)
    out = [param_weight * update.params[key].double().numpy().reshape(-1) for key in params]
    layers = bn_layer_names(template)
    means = {layer: update.buffers[f"{layer}.running_mean"] for layer in layers}
    seconds = {layer: update.buffers[f"{layer}.running_var"].double() + means[layer].double() ** 2 for layer in layers}
    out += statistics_segments(means, seconds, layers, stats_weight)
    batches = [float(update.buffers.get(f"{layer}.num_batches_tracked", torch.zeros(()))) for layer in layers]
    out.append(np.asarray(batches, dtype=np.float64))
    return out


def decode_statistics(
    segments: list[np.ndarray], template: Mapping[str, Tensor], total_weight: float
) -> dict[str, Tensor]:
    """``running_mean``/``running_var`` of every BN layer from the summed moments."""
    out: dict[str, Tensor] = {}
    for i, layer in enumerate(bn_layer_names(template)):
        mean = segments[2 * i] / total_weight
        var = np.maximum(segments[2 * i + 1] / total_weight - mean * mean, 0.0)
        for leaf, values in (("running_mean", mean), ("running_var", var)):
            ref = template[f"{layer}.{leaf}"]
            out[f"{layer}.{leaf}"] = torch.from_numpy(values).to(ref.dtype).reshape(ref.shape)
    return out


def decode_merge(
    segments: list[np.ndarray], template: Mapping[str, Tensor], param_total: float, stats_total: float
) -> dict[str, Tensor]:
    """The merged state dict from the first round's decoded sums, in the template's order and dtypes."""
    params, _ = split_state(template)
    merged: dict[str, Tensor] = {}
    for key, values in zip(params, segments, strict=False):
        ref = template[key]
        merged[key] = torch.from_numpy(values / param_total).to(ref.dtype).reshape(ref.shape)
    layers = bn_layer_names(template)
    statistics = segments[len(params) : len(params) + 2 * len(layers)]
    merged.update(decode_statistics(statistics, template, stats_total))
    for layer, batches in zip(layers, segments[-1], strict=True):
        key = f"{layer}.num_batches_tracked"
        if key in template:
            merged[key] = torch.tensor(round(batches), dtype=template[key].dtype)
    return {key: merged[key] for key in template}
