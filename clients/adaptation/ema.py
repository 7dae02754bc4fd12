"""The mean teacher: an exponential moving average of the student's parameters.

Pseudo-labels from a slowly moving average are steadier than the student's own
predictions, which would otherwise confirm their own mistakes step by step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMATeacher", "ema_alpha"]


def ema_alpha(step: int, max_alpha: float) -> float:
    """alpha_t = min(1 - 1/(t+1), max_alpha): the teacher follows closely while the student is young."""
    return min(1.0 - 1.0 / (step + 1), max_alpha)


class EMATeacher:
    """A frozen copy of the student, always in eval mode.

    Only parameters are averaged (as in DAFormer/HRDA): the teacher's BN buffers are its
    own, set from the target images by :func:`clients.adaptation.norm.refresh_bn`, so the
    pseudo-labels always see target-domain statistics whatever the student's BN does.
    ``max_alpha=0`` makes the teacher a plain copy of the student after every step.
    """

    def __init__(self, student: nn.Module, max_alpha: float = 0.999) -> None:
        if not 0.0 <= max_alpha < 1.0:
            raise ValueError(f"EMA max_alpha must be in [0, 1), not {max_alpha}")
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.max_alpha = max_alpha

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Average in the student after optimiser step ``step`` (0-based); returns the alpha used."""
        alpha = ema_alpha(step, self.max_alpha)
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        return alpha

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the teacher's logits at the input resolution, in float32 even under autocast.

        The confidence threshold (0.968) sits where bfloat16's steps are 0.004 wide.
        """
        self.model.eval()
        return self.model(images).float().softmax(1)
