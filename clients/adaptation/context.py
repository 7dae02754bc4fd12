"""What a site holds besides its target images, as every adaptation method receives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.device.spec import Compute

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["AdaptContext"]


@dataclass
class AdaptContext:
    """What a site holds besides its target images."""

    source: Dataset | None = None  # labeled source set, when the site has it (HRDA)
    checkpoint_dir: str = ""  # where long runs keep resumable state; "" = no resume
    progress: bool = True
    seed: int = 0
    backbone_weights: str = ""  # ImageNet weights for the feature distance, when given
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the method
    compute: Compute = field(default_factory=Compute)  # the site's device (resolved) and amp; the CPU at float32
