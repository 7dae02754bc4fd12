"""Joint image/label transforms on torchvision.transforms.v2.

Wrapping the label as a ``tv_tensors.Mask`` is what makes v2 resize it with nearest
neighbour and pad it with the ignore value, so image and label can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.data.classes import IGNORE

__all__ = ["TrainAugment", "joint_resize"]


def joint_resize(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize to (H, W): bilinear with antialias for the image, nearest for the label."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    out_image, out_label = v2.Resize(list(size), antialias=True)(tv_tensors.Image(image), tv_tensors.Mask(label))
    return out_image.as_subclass(Tensor).clamp_(0.0, 1.0), out_label.as_subclass(Tensor)


@dataclass(frozen=True)
class TrainAugment:
    """Random scale, random crop, horizontal flip, for one (image, label).

    Scaling is relative to the input's shorter side; the crop (default: the input size)
    is padded with black and ignore labels where the scaled image is smaller, so the loss
    never trains on invented pixels. Randomness comes from torch's global generator: seed
    it for repeatable runs.
    """

    scale: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    crop: tuple[int, int] | None = None

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        h, w = image.shape[-2:]
        crop = self.crop or (h, w)
        ops: list[v2.Transform] = []
        if self.scale != (1.0, 1.0):
            short = min(h, w)
            ops.append(v2.RandomResize(round(short * self.scale[0]), round(short * self.scale[1]) + 1, antialias=True))
        if ops or tuple(crop) != (h, w):
            fill = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE}
            ops.append(v2.RandomCrop(list(crop), pad_if_needed=True, fill=fill))
        if self.flip:
            ops.append(v2.RandomHorizontalFlip())
        if not ops:
            return image, label
        out_image, out_label = v2.Compose(ops)(tv_tensors.Image(image), tv_tensors.Mask(label))
        return out_image.as_subclass(Tensor).clamp_(0.0, 1.0), out_label.as_subclass(Tensor).to(torch.int64)
