"""A bank of per-domain BN statistics shipped with one merged model, chosen image by image.

One set of BN statistics for several domains is a compromise: exact day statistics
normalise a dusk image badly. FedBN keeps each domain's statistics but needs the domain at
test time. The bank keeps one entry per site and lets each image pick its own: the entry
whose first BN layer statistics are closest (symmetric KL between diagonal Gaussians) to
the image's own statistics at that layer. Everything else in the model is the one merged
model; only the normalisation follows the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["BANK_META", "BANK_PREFIX", "BNBank", "symmetric_kl"]

BANK_PREFIX = "bnbank."  # tensors "bnbank.<layer>.running_mean" [K, C] in a checkpoint
BANK_META = "fedmerge.bnbank"  # the checkpoint metadata naming the entries' sites, comma-separated
_EPS = 1e-5


@dataclass(frozen=True)
class BNBank:
    """K entries of running mean and variance for every BN layer, and the site each came from."""

    names: tuple[str, ...]
    mean: dict[str, Tensor]  # layer -> [K, C]
    var: dict[str, Tensor]

    def __post_init__(self) -> None:
        for layer, m in self.mean.items():
            if m.shape[0] != len(self.names) or self.var[layer].shape != m.shape:
                raise ValueError(f"BN bank layer {layer!r}: {tuple(m.shape)} for {len(self.names)} entries")

    def tensors(self) -> dict[str, Tensor]:
        """The bank as checkpoint tensors."""
        out = {}
        for layer in self.mean:
            out[f"{BANK_PREFIX}{layer}.running_mean"] = self.mean[layer]
            out[f"{BANK_PREFIX}{layer}.running_var"] = self.var[layer]
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], names: tuple[str, ...]) -> BNBank:
        layers = [k[len(BANK_PREFIX) : -len(".running_mean")] for k in tensors if k.endswith(".running_mean")]
        mean = {layer: tensors[f"{BANK_PREFIX}{layer}.running_mean"] for layer in layers}
        var = {layer: tensors[f"{BANK_PREFIX}{layer}.running_var"] for layer in layers}
        return cls(names, mean, var)


def symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """KL(a||b) + KL(b||a) of diagonal Gaussians, summed over the last (channel) axis; broadcasts."""
    var_a, var_b = var_a + _EPS, var_b + _EPS
    diff = (mean_a - mean_b) ** 2
    return ((var_a + diff) / (2 * var_b) + (var_b + diff) / (2 * var_a) - 1).sum(-1)
