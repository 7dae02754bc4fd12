"""DAFormer's decode head (Hoyer et al., 2022) on a MiT-B5 encoder: ``daformer_b5``.

No maintained library ships this head, so it is written here from the paper's
description. Each encoder level gets a linear embedding to a common width; the
embeddings, at the finest level's resolution, are concatenated and fused by a
context-aware module: a 1x1 branch and depthwise-separable 3x3 branches at dilations
6, 12 and 18 (each with BN and ReLU, depthwise and pointwise alike), concatenated and
reduced by a 3x3 conv with BN and ReLU; dropout and a 1x1 classifier follow.

Module names follow the released mmsegmentation head (``embed_layers.<i>.proj``,
``fuse_layer.aspp_modules``, ``fuse_layer.bottleneck``, ``conv_seg``; ConvModule's
``conv``/``bn``), so a DAFormer checkpoint maps onto it by a prefix change
(``common.models.weight_import``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.models.catalog import MiTOptions
from common.models.segformer import DROPOUT, MiTSegmenter, mit_encoder

__all__ = ["ContextFusion", "DAFormerHead", "build_daformer"]

EMBED_WIDTH = 256  # DAFormer: every level embedded to 256 channels; the fused width is 256 too
DILATIONS = (6, 12, 18)  # the separable branches; a 1x1 branch comes first


class ChannelLinear(nn.Module):
    """A per-pixel linear map stored as ``nn.Linear`` (mmseg's MLP embedding), on NCHW maps."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBNReLU(nn.Module):
    """Conv (no bias: BN follows), BN, ReLU, under mmcv ConvModule's names ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparableBranch(nn.Module):
    """A dilated depthwise 3x3 then a pointwise 1x1, each with BN and ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, 3, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ContextFusion(nn.Module):
    """DAFormer's fusion: parallel 1x1 and separable dilated branches, concatenated, then a 3x3 bottleneck."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int] = DILATIONS) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNReLU(cin, cout, 1)]
        branches += [SeparableBranch(cin, cout, d) for d in dilations]
        self.aspp_modules = nn.ModuleList(branches)
        self.bottleneck = ConvBNReLU(len(branches) * cout, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """Embeddings of every level (finest first, at one resolution), the fusion, dropout, classifier."""

    def __init__(self, level_channels: Sequence[int], num_classes: int, width: int = EMBED_WIDTH) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): ChannelLinear(c, width) for i, c in enumerate(level_channels)})
        self.fuse_layer = ContextFusion(width * len(level_channels), width)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.conv_seg = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        embedded = [layer(level) for layer, level in zip(self.embed_layers.values(), levels, strict=True)]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


def build_daformer(num_classes: int, options: MiTOptions) -> MiTSegmenter:
    encoder = mit_encoder(options.encoder)
    return MiTSegmenter(encoder, DAFormerHead(encoder.out_channels[2:], num_classes))
