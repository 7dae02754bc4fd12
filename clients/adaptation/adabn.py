"""AdaBN: adapt only the BN statistics, which the exact statistics pass already does."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from clients.adaptation.registry import AdaptContext, register
from common.models import Segmenter


@dataclass(frozen=True)
class AdaBNConfig:
    """No options: the re-estimation itself is the method."""


@register("adabn", AdaBNConfig, summary="re-estimate BN statistics on the target images; nothing else")
def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: AdaBNConfig) -> None:
    del model, target, context, config  # the site's BN pass does all the work
