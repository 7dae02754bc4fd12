"""Joint image/label transforms on torchvision.transforms.v2.

Wrapping the label as a ``tv_tensors.Mask`` is what makes v2 resize it with nearest
neighbour and pad it with the ignore value, so image and label can never drift apart.
torchvision is imported where a transform runs: importing it costs a ClientApp worker about
3 s of start-up, and a site whose images need no transform never pays it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.data.classes import IGNORE

__all__ = ["PhotometricAugment", "TrainAugment", "joint_resize"]


def joint_resize(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize to (H, W): bilinear with antialias for the image, nearest for the label."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    from torchvision import tv_tensors
    from torchvision.transforms import v2

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
        from torchvision import tv_tensors
        from torchvision.transforms import v2

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


Range = tuple[float, float]


def _check_range(name: str, bounds: Range) -> None:
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"photometric {name} range must satisfy 0 < low <= high, got {bounds}")


def _log_uniform(bounds: Range) -> float:
    """A factor drawn uniformly in log space, so x0.5 and x2 are equally likely: light changes multiply."""
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + (high - low) * float(torch.rand((), device="cpu")))  # data-side: the CPU


@dataclass(frozen=True)
class PhotometricAugment:
    """Random gamma, brightness, contrast and saturation of the image; the label is never touched.

    A day source meets dusk frames (about half as bright, flatter contrast) and other routes in
    other light; jittering the light of the source frames teaches a model that light is not a
    class cue. Each factor is drawn log-uniformly in its range (1.0 = no change), and the whole
    jitter is applied with probability ``p`` so the model also sees the source as it is.
    Randomness comes from torch's global generator, like :class:`TrainAugment`.
    """

    brightness: Range = (0.5, 1.5)
    contrast: Range = (0.7, 1.4)
    saturation: Range = (0.7, 1.4)
    gamma: Range = (0.7, 1.5)
    p: float = 0.8

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "gamma"):
            _check_range(name, getattr(self, name))
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"photometric probability must be in [0, 1], got {self.p}")

    def __call__(self, image: Tensor) -> Tensor:
        """``image``: float [3, H, W] (or [N, 3, H, W]) in [0, 1]; returns a new tensor in [0, 1]."""
        if float(torch.rand((), device="cpu")) >= self.p:
            return image
        from torchvision.transforms.v2 import functional as TF

        out = TF.adjust_gamma(image, _log_uniform(self.gamma))
        out = TF.adjust_brightness(out, _log_uniform(self.brightness))
        out = TF.adjust_contrast(out, _log_uniform(self.contrast))
        out = TF.adjust_saturation(out, _log_uniform(self.saturation))
        return out.clamp(0.0, 1.0)
