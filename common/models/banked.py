"""A merged model that normalises each image with the closest entry of a BN bank (``common.bn.bank``).

The bank holds one set of BN statistics per site; this wrapper measures each image's own
statistics at the first BN layer, picks the entry closest to them (symmetric KL) and runs
the image through the model with that entry loaded. Everything but the normalisation is
the one merged model. With the bank's ``image_weight`` w > 0, every BN layer normalises each
image with its entry's statistics mixed with the image's own (``common.bn.bank``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from common.bn.bank import BNBank, symmetric_kl
from common.bn.stats import bn_layers
from common.models.segmenter import Segmenter

__all__ = ["BankedSegmenter", "mixed_batch_norm"]


def mixed_batch_norm(layer: nn.modules.batchnorm._BatchNorm, x: Tensor, image_weight: float) -> Tensor:
    """``layer`` in eval mode, but each image normalised by (1-w)·stored + w·its own mean and variance.

    The image's statistics are over every position of each channel (population variance),
    as the stored ones are over a site's images.
    """
    dims = list(range(2, x.dim()))
    shape = (1, -1) + (1,) * len(dims)
    own_mean = x.mean(dims, keepdim=True)
    own_var = x.var(dims, unbiased=False, keepdim=True)
    mean = (1 - image_weight) * layer.running_mean.view(shape) + image_weight * own_mean
    var = (1 - image_weight) * layer.running_var.view(shape) + image_weight * own_var
    out = (x - mean) / torch.sqrt(var + layer.eps)
    if layer.affine:
        out = out * layer.weight.view(shape) + layer.bias.view(shape)
    return out


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
        if len(self.bank.names) == 1:  # the merge's own statistics with an image weight: nothing to choose
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        mean, var = self.image_statistics(x[: x.shape[0]])
        bank_mean = self.bank.mean[self._first].to(mean.device, torch.float64)  # the bank stays on the CPU
        bank_var = self.bank.var[self._first].to(mean.device, torch.float64)
        distance = symmetric_kl(mean[:, None], var[:, None], bank_mean[None], bank_var[None])
        return distance.argmin(1)

    def _load(self, k: int) -> None:
        for name, layer in self._layers.items():
            layer.running_mean.copy_(self.bank.mean[name][k])
            layer.running_var.copy_(self.bank.var[name][k])

    def _mix_images(self) -> list[RemovableHandle]:
        """Hooks that renormalise every BN layer's output with the image's own statistics mixed in."""
        weight = self.bank.image_weight

        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return mixed_batch_norm(layer, inputs[0], weight)  # type: ignore[arg-type]

        return [layer.register_forward_hook(hook) for layer in self._layers.values()] if weight > 0 else []

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("a BN bank chooses statistics for inference; train the model it wraps")
        choice = self.choose(x)
        saved = {n: (layer.running_mean.clone(), layer.running_var.clone()) for n, layer in self._layers.items()}
        out: Tensor | None = None
        handles = self._mix_images()
        try:
            for k in choice.unique().tolist():
                self._load(int(k))
                picked = choice == k
                logits = self.model(x[picked])
                if out is None:
                    out = logits.new_empty((x.shape[0], *logits.shape[1:]))
                out[picked] = logits
        finally:
            for handle in handles:
                handle.remove()
            for name, layer in self._layers.items():
                layer.running_mean.copy_(saved[name][0])
                layer.running_var.copy_(saved[name][1])
        assert out is not None
        return out
