"""Exact BatchNorm statistics: Σx, Σx² and n per channel over a whole image set.

BN running statistics are EMAs of the last few hundred batches, and even PyTorch's
cumulative mode averages per-batch variances, missing the spread between batch means.
Summing in float64 over every value a layer normalises gives the exact mean and
population variance, so that pooling sums from several sites equals computing them
on the union of their images. This pass is also the AdaBN baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.device.runtime import full_precision, model_device

__all__ = [
    "BNStatsConfig",
    "BNSums",
    "CountProfile",
    "apply_bn_sums",
    "bn_count_profile",
    "bn_layers",
    "collect_bn_sums",
    "exact_bn_statistics",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BNStatsConfig:
    """How the statistics pass normalises while it measures.

    ``mode="batch"`` normalises each batch by its own statistics (AdaBN); the values
    downstream layers see are then close to what the new statistics will produce.
    ``mode="eval"`` keeps the model's current statistics, so a set's sums do not depend
    on how it was cut into batches: the recalibration round uses this.
    """

    mode: str = "batch"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("batch", "eval"):
            raise ValueError(f"BNStatsConfig.mode must be 'batch' or 'eval', not {self.mode!r}")


@dataclass
class BNSums:
    """Per-channel float64 sums for one BN layer."""

    sum: Tensor
    sum_sq: Tensor
    count: Tensor  # int64, values per channel

    def mean(self) -> Tensor:
        return self.sum / self.count

    def var(self) -> Tensor:
        mean = self.mean()
        return (self.sum_sq / self.count - mean * mean).clamp_min(0.0)

    def __add__(self, other: BNSums) -> BNSums:
        return BNSums(self.sum + other.sum, self.sum_sq + other.sum_sq, self.count + other.count)

    def cpu(self) -> BNSums:
        """The sums as they leave a site: on the CPU (the same tensors when they are there already)."""
        return BNSums(self.sum.cpu(), self.sum_sq.cpu(), self.count.cpu())


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers that track running statistics, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def _reduce_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _make_hook(store: dict[str, BNSums], name: str, batch_mode: bool):
    def hook(module: nn.modules.batchnorm._BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        x = inputs[0].detach()
        dims = _reduce_dims(x)
        xd = x.double()
        s, s2 = xd.sum(dim=dims), (xd * xd).sum(dim=dims)
        n = x.numel() // x.shape[1]
        count = torch.full_like(s, n, dtype=torch.int64)
        store[name] = store[name] + BNSums(s, s2, count) if name in store else BNSums(s, s2, count)
        if not batch_mode or n < 2:
            return None
        mean = (s / n).to(x.dtype)
        var = (s2 / n - (s / n) ** 2).clamp_min(0).to(x.dtype)
        return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)

    return hook


@torch.no_grad()
def collect_bn_sums(
    model: nn.Module,
    images: Iterable[Tensor],
    config: BNStatsConfig = BNStatsConfig(),
) -> dict[str, BNSums]:
    """One pass over ``images`` (batches of NCHW tensors, moved to the model's device); the model is left unchanged.

    The pass runs at full precision even inside an autocast region: the statistics describe
    float32 activations and are summed in float64 on the model's device, whatever the run's
    ``amp``; the sums stay where they were computed (``BNSums.cpu`` brings them back).
    """
    layers = bn_layers(model)
    if not layers:  # e.g. a LayerNorm encoder under a head without BN: the merge averages parameters only
        log.info("the model has no BN layers: the statistics pass has nothing to measure")
        return {}
    store: dict[str, BNSums] = {}
    was_training = model.training
    model.eval()
    device = model_device(model)
    handles = [m.register_forward_hook(_make_hook(store, n, config.mode == "batch")) for n, m in layers.items()]
    try:
        for batch in tqdm(images, desc="BN statistics", disable=not config.progress, leave=False):
            with full_precision(device):
                model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not store:
        raise ValueError("no images reached the BN statistics pass: the image set is empty")
    return store


@dataclass(frozen=True)
class CountProfile:
    """How many values each BN layer sees per image, as the architecture fixes it.

    ``spatial``: layers whose count grows with the image, as a share of the first such
    layer's (up to the rounding of odd image sides); ``fixed``: layers after a global
    pooling, which see the same number of values per image whatever its size.
    """

    spatial: dict[str, float]
    fixed: dict[str, int]


def bn_count_profile(model: nn.Module, probe: tuple[int, int] = (64, 64)) -> CountProfile:
    """Measured on two probe images, one twice the other's side, so that the two kinds of layer tell apart."""

    def counts(h: int, w: int) -> dict[str, int]:
        probe_image = torch.zeros(1, 3, h, w, device=model_device(model))
        return {name: int(s.count[0]) for name, s in collect_bn_sums(model, [probe_image]).items()}

    small, large = counts(*probe), counts(2 * probe[0], 2 * probe[1])
    fixed = {name: n for name, n in small.items() if large[name] == n}
    spatial = [name for name in small if name not in fixed]
    first = small[spatial[0]] if spatial else 1
    return CountProfile({name: small[name] / first for name in spatial}, fixed)


def apply_bn_sums(model: nn.Module, sums: dict[str, BNSums]) -> None:
    """Replace the running statistics by the exact ones."""
    for name, layer in bn_layers(model).items():
        if name not in sums:
            raise KeyError(f"no statistics for BN layer {name!r}")
        st = sums[name]
        layer.running_mean.copy_(st.mean().to(layer.running_mean.dtype))
        layer.running_var.copy_(st.var().to(layer.running_var.dtype))


def exact_bn_statistics(
    model: nn.Module, images: Iterable[Tensor], config: BNStatsConfig = BNStatsConfig()
) -> dict[str, Tensor]:
    """Measure, install, and return the per-layer counts (``{layer: int64[C]}``, on the CPU: they leave the site)."""
    sums = collect_bn_sums(model, images, config)
    apply_bn_sums(model, sums)
    return {name: st.count.cpu() for name, st in sums.items()}
