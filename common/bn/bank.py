"""A bank of per-domain BN statistics shipped with one merged model, chosen image by image.

One set of BN statistics for several domains is a compromise: exact day statistics
normalise a dusk image badly. FedBN keeps each domain's statistics but needs the domain at
test time. The bank keeps one entry per site and lets each image pick its own: the entry
whose first BN layer statistics are closest (symmetric KL between diagonal Gaussians) to
the image's own statistics at that layer. Everything else in the model is the one merged
model; only the normalisation follows the image.

A bank entry describes a site's images as a whole; one test image can sit away from all of
them (a foggier frame, a darker one). ``image_weight`` w mixes, at every BN layer, the image's
own statistics into its entry's: mean (1-w)·μ_bank + w·μ_image, variance likewise (the prior
of Schneider et al. 2020, "Improving robustness against common corruptions by covariate shift
adaptation", with w = n/(N+n) for one image, n = 1). w = 0 is the plain bank; a bank of one
entry (the merged statistics) with w > 0 is the merged model normalising with that prior.

A bank of the model's own statistics (``BNBank.single``) repeats what the model's BN buffers
already hold, so a checkpoint stores only its name and weight in the metadata: the file keeps
exactly the plain architecture's keys and loads into it with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "BANK_META",
    "BANK_PREFIX",
    "IMAGE_WEIGHT_META",
    "BNBank",
    "bank_from_checkpoint",
    "bank_to_checkpoint",
    "symmetric_kl",
]

BANK_PREFIX = "bnbank."  # tensors "bnbank.<layer>.running_mean" [K, C] in a checkpoint
BANK_META = "fedmerge.bnbank"  # the checkpoint metadata naming the entries' sites, comma-separated
IMAGE_WEIGHT_META = "fedmerge.bnbank.image-weight"  # the checkpoint metadata holding ``image_weight``
_EPS = 1e-5


@dataclass(frozen=True)
class BNBank:
    """K entries of running mean and variance for every BN layer, and the site each came from."""

    names: tuple[str, ...]
    mean: dict[str, Tensor]  # layer -> [K, C]
    var: dict[str, Tensor]
    image_weight: float = 0.0  # the share of each test image's own statistics in its normalisation
    own: bool = False  # the one entry is the model's own BN buffers (``single``): a checkpoint stores no copy

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"a BN bank's image weight must be in [0, 1], not {self.image_weight}")
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
    def from_tensors(cls, tensors: Mapping[str, Tensor], names: tuple[str, ...], image_weight: float = 0.0) -> BNBank:
        layers = [k[len(BANK_PREFIX) : -len(".running_mean")] for k in tensors if k.endswith(".running_mean")]
        mean = {layer: tensors[f"{BANK_PREFIX}{layer}.running_mean"] for layer in layers}
        var = {layer: tensors[f"{BANK_PREFIX}{layer}.running_var"] for layer in layers}
        return cls(names, mean, var, image_weight)

    @classmethod
    def single(cls, name: str, buffers: Mapping[str, Tensor], image_weight: float) -> BNBank:
        """A bank of one entry, a model's own BN statistics: only the image's share changes its normalisation."""
        layers = [k[: -len(".running_mean")] for k in buffers if k.endswith(".running_mean")]
        mean = {layer: buffers[f"{layer}.running_mean"].reshape(1, -1) for layer in layers}
        var = {layer: buffers[f"{layer}.running_var"].reshape(1, -1) for layer in layers}
        return cls((name,), mean, var, image_weight, own=True)


def bank_to_checkpoint(bank: BNBank) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata a checkpoint carries for ``bank``: no tensors for the model's own statistics."""
    meta = {BANK_META: ",".join(bank.names)}
    if bank.image_weight > 0:
        meta[IMAGE_WEIGHT_META] = repr(bank.image_weight)
    return ({} if bank.own else bank.tensors()), meta


def bank_from_checkpoint(
    bank_tensors: Mapping[str, Tensor], meta: Mapping[str, str], state: Mapping[str, Tensor]
) -> BNBank | None:
    """The bank a checkpoint carries: stored entries, or its own statistics with an image weight, or none."""
    weight = float(meta.get(IMAGE_WEIGHT_META, "0"))
    names = tuple(meta.get(BANK_META, "").split(","))
    if bank_tensors:
        return BNBank.from_tensors(bank_tensors, names, weight)
    if weight > 0:
        return BNBank.single(names[0] or "merged", state, weight)
    return None


def symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """KL(a||b) + KL(b||a) of diagonal Gaussians, summed over the last (channel) axis; broadcasts."""
    var_a, var_b = var_a + _EPS, var_b + _EPS
    diff = (mean_a - mean_b) ** 2
    return ((var_a + diff) / (2 * var_b) + (var_b + diff) / (2 * var_a) - 1).sum(-1)
