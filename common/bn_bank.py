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

import torch
from torch import Tensor, nn

from common.bnstats import bn_layers
from common.models import Segmenter

__all__ = ["BANK_META", "BANK_PREFIX", "BNBank", "BankedSegmenter", "symmetric_kl"]

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


class _Probed(Exception):
    """Stops a forward pass once the first BN layer's input has been seen."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


class BankedSegmenter(Segmenter):
    """``model`` whose BN statistics come, image by image, from the closest entry of ``bank``."""

    def __init__(self, model: Segmenter, bank: BNBank) -> None:
        super().__init__()
        self.model, self.bank = model, bank
        self._layers = bn_layers(model)
        if not self._layers:
            raise ValueError("the model has no BN layers, so a BN bank has nothing to choose between")
        missing = set(bank.mean) ^ set(self._layers)
        if missing:
            raise ValueError(f"BN bank and model disagree on the BN layers, e.g. {sorted(missing)[0]!r}")
        self._first = next(iter(self._layers))

    def final_layer(self) -> nn.Conv2d:
        return self.model.final_layer()

    @property
    def feature_channels(self) -> int:
        return self.model.feature_channels

    @torch.no_grad()
    def image_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each image's per-channel mean and variance at the input of the first BN layer: [B, C] each."""

        def stop(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            raise _Probed(inputs[0])

        handle = self._layers[self._first].register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _Probed as probe:
            value = probe.value.double()
        else:
            raise RuntimeError("the model's first BN layer was never reached")
        finally:
            handle.remove()
        dims = [d for d in range(value.dim()) if d not in (0, 1)]
        return value.mean(dims), value.var(dims, unbiased=False)

    @torch.no_grad()
    def choose(self, x: Tensor) -> Tensor:
        """The bank entry of each image: [B] indices."""
        mean, var = self.image_statistics(x[: x.shape[0]])
        bank_mean = self.bank.mean[self._first].double()
        bank_var = self.bank.var[self._first].double()
        distance = symmetric_kl(mean[:, None], var[:, None], bank_mean[None], bank_var[None])
        return distance.argmin(1)

    def _load(self, k: int) -> None:
        for name, layer in self._layers.items():
            layer.running_mean.copy_(self.bank.mean[name][k])
            layer.running_var.copy_(self.bank.var[name][k])

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("a BN bank chooses statistics for inference; train the model it wraps")
        choice = self.choose(x)
        saved = {n: (layer.running_mean.clone(), layer.running_var.clone()) for n, layer in self._layers.items()}
        out: Tensor | None = None
        try:
            for k in choice.unique().tolist():
                self._load(int(k))
                picked = choice == k
                logits = self.model(x[picked])
                if out is None:
                    out = logits.new_empty((x.shape[0], *logits.shape[1:]))
                out[picked] = logits
        finally:
            for name, layer in self._layers.items():
                layer.running_mean.copy_(saved[name][0])
                layer.running_var.copy_(saved[name][1])
        assert out is not None
        return out
