"""AdamW with a larger head learning rate, and the warm-up + poly schedule.

The decode head meets the new domain's features first and is cheap to move, while the
backbone carries the pretrained representation: DAFormer gives the head 10x the rate.
The schedule is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from common.models.segmenter import Segmenter

__all__ = ["Schedule", "build_optimizer", "set_lr"]


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up over ``warmup`` steps, then (1 - t/steps)^power down to zero."""

    steps: int
    warmup: int = 0
    power: float = 1.0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, 1.0 - step / max(self.steps, 1)) ** self.power


def _trainable(params: Iterable[nn.Parameter], seen: set[int]) -> list[nn.Parameter]:
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def build_optimizer(
    model: Segmenter, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.01
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: head x ``head_lr_mult``, everything else x 1.

    Frozen parameters (``requires_grad=False``, e.g. a source-free method's classifier)
    are left out, so weight decay cannot move them either.
    """
    seen: set[int] = set()
    head = _trainable(model.head_parameters(), seen)
    rest = _trainable(model.parameters(), seen)
    groups = [{"params": g, "base_lr": lr * m} for g, m in ((rest, 1.0), (head, head_lr_mult)) if g]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's base learning rate (its rate when first seen here) by the schedule factor."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
