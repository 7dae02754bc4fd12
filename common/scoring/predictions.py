"""Label-free quantities of a softmax prediction, shared by the sites' losses, metrics and scores.

A site has no labels, so what it can say about a prediction is how sure it is. These
are defined once, so that the pseudo-label weight, the reported confident fraction and
any later label-free score agree on what "confident" means.
"""

from __future__ import annotations

import math

from torch import Tensor

from common.scoring.confidence import CONFIDENCE_THRESHOLD

__all__ = ["CONFIDENCE_THRESHOLD", "confident_fraction", "normalized_entropy"]


def normalized_entropy(probs: Tensor) -> Tensor:
    """Per-pixel entropy divided by log C, in [0, 1]: comparable across class counts. [B, H, W]."""
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return ent / math.log(probs.shape[1])


def confident_fraction(probs: Tensor, threshold: float = CONFIDENCE_THRESHOLD) -> Tensor:
    """Per image, the fraction of pixels whose top probability reaches ``threshold``. [B]."""
    return (probs.amax(1) >= threshold).flatten(1).float().mean(1)
