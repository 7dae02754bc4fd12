"""ClassMix and the strong augmentation of mixed images (DACS).

Pasting whole classes of one image onto another makes images whose label is known
where it was pasted and pseudo-labelled elsewhere: the network must get both right
in the same context, which transfers what the pasted image teaches across domains.
All randomness comes from an explicit generator, so a resumed run repeats itself; it is a
CPU generator on any device (its small draws move to the images), so a GPU run mixes and
augments as a CPU run does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from common.data import IGNORE

__all__ = ["MixedBatch", "StrongAugment", "class_mix", "class_mix_mask"]


def class_mix_mask(label: Tensor, generator: torch.Generator) -> Tensor:
    """Bool [H, W]: the pixels of a random half of the classes present in ``label`` (ignore excluded)."""
    classes = label.unique()
    classes = classes[classes != IGNORE]
    if classes.numel() == 0:
        return torch.zeros_like(label, dtype=torch.bool)
    order = torch.randperm(classes.numel(), generator=generator, device=generator.device).to(classes.device)
    chosen = classes[order[: (classes.numel() + 1) // 2]]
    return torch.isin(label, chosen)


@dataclass
class MixedBatch:
    images: Tensor  # [B, 3, H, W]
    labels: Tensor  # [B, H, W]
    weights: Tensor  # [B, H, W]
    masks: Tensor  # [B, H, W] bool, True where the pasted image shows


def class_mix(
    paste_images: Tensor,
    paste_labels: Tensor,
    base_images: Tensor,
    base_labels: Tensor,
    base_weights: Tensor,
    generator: torch.Generator,
    paste_weight: float = 1.0,
) -> MixedBatch:
    """Paste half the classes of image i of ``paste_*`` onto image i of ``base_*``.

    Under the mask the label is the pasted label with ``paste_weight``; elsewhere the
    base (pseudo-)label with its per-image weight ``base_weights`` [B].
    """
    masks = torch.stack([class_mix_mask(lbl, generator) for lbl in paste_labels])
    images = torch.where(masks.unsqueeze(1), paste_images, base_images)
    labels = torch.where(masks, paste_labels, base_labels)
    base_w = base_weights.view(-1, 1, 1).expand_as(labels)
    weights = torch.where(masks, torch.full_like(base_w, paste_weight), base_w)
    return MixedBatch(images, labels, weights, masks)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


@dataclass(frozen=True)
class StrongAugment:
    """Colour jitter (p=0.8) then Gaussian blur (p=0.5), per image, as in DACS/DAFormer.

    Defaults: brightness, contrast, saturation and hue strength 0.2; blur sigma ~ U(0.15, 1.15)
    with an odd kernel of about 10 % of the shorter side. Labels are unchanged: nothing moves.
    """

    jitter: float = 0.2
    jitter_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return torch.stack([self._one(img, generator) for img in images])

    def _one(self, image: Tensor, generator: torch.Generator) -> Tensor:
        from torchvision.transforms.v2 import functional as TF  # here: the import costs a ClientApp worker ~3 s

        s = self.jitter
        if s > 0 and float(torch.rand((), generator=generator, device=generator.device)) < self.jitter_prob:
            image = TF.adjust_brightness(image, _uniform(generator, 1 - s, 1 + s))
            image = TF.adjust_contrast(image, _uniform(generator, 1 - s, 1 + s))
            image = TF.adjust_saturation(image, _uniform(generator, 1 - s, 1 + s))
            image = TF.adjust_hue(image, _uniform(generator, -min(s, 0.5), min(s, 0.5)))
        if float(torch.rand((), generator=generator, device=generator.device)) < self.blur_prob:
            side = min(image.shape[-2:])
            kernel = 2 * max(1, round(0.05 * side)) + 1
            sigma = _uniform(generator, *self.blur_sigma)
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        return image.clamp(0.0, 1.0)
