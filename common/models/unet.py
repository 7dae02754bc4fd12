"""A small BN U-Net: fast enough on two CPU cores for demos, tests and CamVid.

Every layer but the last is conv + BN + ReLU, so every layer has BN statistics to adapt
and merge: the network the merging maths is easiest to see on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.catalog import UNetOptions
from common.models.segmenter import Segmenter

__all__ = ["SmallUNet", "build_small_unet"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Encoder(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth)]
        self.stem = nn.Sequential(_conv_bn(3, chans[0]), _conv_bn(chans[0], chans[0]))
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _conv_bn(chans[i - 1], chans[i]), _conv_bn(chans[i], chans[i]))
            for i in range(1, depth)
        )
        self.channels = chans

    def forward(self, x: Tensor) -> list[Tensor]:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        return skips


class _Decoder(nn.Module):
    def __init__(self, chans: list[int]) -> None:
        super().__init__()
        self.up = nn.ModuleList(
            nn.Sequential(_conv_bn(chans[i] + chans[i - 1], chans[i - 1]), _conv_bn(chans[i - 1], chans[i - 1]))
            for i in range(len(chans) - 1, 0, -1)
        )

    def forward(self, skips: list[Tensor]) -> Tensor:
        x = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class _UNetBackbone(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.encoder = _Encoder(width, depth)
        self.decoder = _Decoder(self.encoder.channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class SmallUNet(Segmenter):
    """A small BN U-Net: fast enough on two CPU cores for demos, tests and CamVid."""

    def __init__(self, num_classes: int, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.backbone = _UNetBackbone(width, depth)
        self._feature_channels = width
        self.classifier = nn.Sequential(_conv_bn(width, width), nn.Conv2d(width, num_classes, 1))

    @property
    def feature_channels(self) -> int:
        return self._feature_channels

    def _features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, feats: Tensor) -> Tensor:
        return self.classifier(feats)


def build_small_unet(num_classes: int, options: UNetOptions) -> SmallUNet:
    return SmallUNet(num_classes, width=options.width, depth=options.depth)
