"""torchvision's segmentation models (DeepLabV3, FCN, LR-ASPP) behind the one Segmenter interface.

They are built with ``weights=None`` and ``weights_backbone=None``: nothing is downloaded;
a local file can be loaded afterwards (``common.models.factory``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.catalog import TorchvisionOptions
from common.models.segmenter import Segmenter

__all__ = ["TorchvisionSegmenter", "build_torchvision"]


class TorchvisionSegmenter(Segmenter):
    """Wraps a torchvision segmentation model (DeepLabV3, FCN, LR-ASPP)."""

    def __init__(self, net: nn.Module, feature_channels: int) -> None:
        super().__init__()
        self.backbone = net.backbone
        self.classifier = net.classifier
        self._feature_channels = feature_channels
        self._dict_head = type(net.classifier).__name__ == "LRASPPHead"

    @property
    def feature_channels(self) -> int:
        return self._feature_channels

    def _features(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        if self._dict_head:
            # LR-ASPP reads a low and a high level map; carry both in one tensor.
            low = F.interpolate(feats["low"], size=feats["high"].shape[-2:], mode="bilinear", align_corners=False)
            return torch.cat([feats["high"], low], dim=1)
        return feats["out"]

    def decode(self, feats: Tensor) -> Tensor:
        if self._dict_head:
            high_c = self._feature_channels
            return self.classifier({"high": feats[:, :high_c], "low": feats[:, high_c:]})
        return self.classifier(feats)


def build_torchvision(num_classes: int, options: TorchvisionOptions) -> TorchvisionSegmenter:
    from torchvision.models import segmentation  # here: torchvision's import costs seconds

    builder = getattr(segmentation, options.builder)
    kwargs: dict[str, object] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if options.builder != "lraspp_mobilenet_v3_large":
        kwargs["aux_loss"] = False
    return TorchvisionSegmenter(builder(**kwargs), options.feature_channels)
