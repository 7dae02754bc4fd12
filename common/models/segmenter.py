"""The one interface every segmentation model has, apart from the modules that build them.

Model modules (``common.models.unet``, ``common.models.segformer``, ``common.models.deeplabv2`` ...) all
subclass :class:`Segmenter`; keeping it in a module of its own lets them, and the wrappers
(``multires``, ``banked``), import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Segmenter"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """A backbone, a decode head and a final classifier layer.

    Inputs are RGB in [0, 1]; the ImageNet normalisation happens inside, in buffers that
    are not part of the state dict, so augmentations work on plain images.
    """

    backbone: nn.Module
    classifier: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_channels(self) -> int:
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Decode-head input for images in [0, 1]."""
        return self._features((x - self.pixel_mean) / self.pixel_std)

    def _features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, feats: Tensor) -> Tensor:
        raise NotImplementedError

    def final_layer(self) -> nn.Conv2d:
        """The last 1x1 convolution: the part a source-free method keeps frozen."""
        convs = [m for m in self.classifier.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decode(self.features(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits
