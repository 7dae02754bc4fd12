"""Losses on unlabeled target pixels: pseudo-labels, entropy terms and negative labels.

All functions take softmax probabilities or logits shaped [B, C, H, W] and reduce to a
scalar by the mean over pixels, so their sizes are comparable whatever the image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from common.data import IGNORE
from common.scoring.predictions import CONFIDENCE_THRESHOLD, confident_fraction, normalized_entropy

__all__ = [
    "confident_fraction",
    "focal_entropy",
    "negative_label_loss",
    "normalized_entropy",
    "pseudo_labels",
    "weighted_cross_entropy",
    "weighted_diversity",
]

_EPS = 1e-6


def pseudo_labels(probs: Tensor, threshold: float = CONFIDENCE_THRESHOLD) -> tuple[Tensor, Tensor]:
    """Arg-max labels and ONE weight per image: its fraction of confident pixels (DACS/DAFormer).

    A per-image weight rather than a per-pixel mask keeps the loss on every pixel (so
    hard classes are not simply dropped) while trusting an image as a whole only as much
    as the teacher is sure about it.
    """
    return probs.argmax(1), confident_fraction(probs, threshold)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Mean over all pixels of weight x CE; ignored pixels (255) count as zero.

    ``weights`` is per pixel [B, H, W] or per image [B].
    """
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    if weights.dim() == 1:
        weights = weights.view(-1, 1, 1)
    return (ce * weights).mean()


def focal_entropy(probs: Tensor, gamma: float = 5.0) -> Tensor:
    """mean[(1 - H)^gamma · H] (DAS3): entropy minimisation that leaves uncertain pixels alone.

    Plain entropy minimisation pushes hardest where the model is most confused, which is
    where it is most often wrong; the focal factor concentrates it on nearly-sure pixels.
    """
    ent = normalized_entropy(probs)
    return ((1.0 - ent).pow(gamma) * ent).mean()


def weighted_diversity(probs: Tensor, alpha: float = 3.0) -> Tensor:
    """Normalised entropy of the confidence-weighted mean prediction (to be maximised).

    w = exp(-alphaH) (detached), m̄_c = Σ w·p_c / N, diversity = -Σ_c m̄_c log m̄_c / log C.
    Entropy terms alone collapse onto the frequent classes; this term keeps the average
    prediction spread, and the weights stop confused pixels from faking that spread.
    """
    weights = torch.exp(-alpha * normalized_entropy(probs)).detach().unsqueeze(1)
    mean = (weights * probs).sum(dim=(0, 2, 3)) / probs[:, 0].numel()
    return -(mean * mean.clamp_min(1e-12).log()).sum() / math.log(probs.shape[1])


def negative_label_loss(probs: Tensor, reference: Tensor, threshold: float = 0.04) -> Tensor:
    """mean(-log(1 - Σ_{c: ref_c < thr} p_c)): push mass off the classes a pixel is surely not.

    Negative labels are right far more often than positive pseudo-labels (a class below
    4 % is almost never the answer), so this is a low-noise signal even on hard images.
    ``reference`` (usually the teacher's probabilities) chooses the classes; ``probs``
    are the student's.
    """
    negative = (reference < threshold).to(probs.dtype)
    mass = (probs * negative).sum(1)
    return -torch.log((1.0 - mass).clamp_min(_EPS)).mean()
