"""SegFormer (Xie et al., 2021): a MiT encoder and the all-MLP decode head, from segmentation-models-pytorch.

The MiT encoder and the SegFormer decoder modules are the library's (their state-dict
keys follow the original release: ``patch_embed1``, ``block1.0.attn.q`` ...), imported
only when a model is built, so the command line starts without the library.

The :class:`~common.models.segmenter.Segmenter` cut needs ONE feature tensor, while the head
reads four levels. The levels are packed into one tensor at the finest level's
resolution (1/4), each upsampled bilinearly and concatenated. The head's per-level
linear embedding then runs after the upsampling instead of before; a 1x1 linear map
commutes with bilinear interpolation (whose weights sum to one), so the prediction is
the original SegFormer's. The packed tensor is still backbone output, which is what the
ImageNet feature distance compares and what HRDA's attention head reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.catalog import MiTOptions
from common.models.segmenter import Segmenter

__all__ = [
    "MIN_SIDE",
    "MiTSegmenter",
    "SegFormerHead",
    "build_segformer",
    "mit_encoder",
    "pack_levels",
    "unpack_levels",
]

DROPOUT = 0.1  # before the classifier, as in the released SegFormer and DAFormer heads
# MiT's first stage embeds at stride 4 (7x7 kernel, padding 3) and its attention reduces the keys by an 8x8
# conv of stride 8, so that stage needs 8 positions a side: floor((side - 1) / 4) + 1 >= 8.
FIRST_STRIDE, FIRST_REDUCTION = 4, 8
MIN_SIDE = FIRST_STRIDE * (FIRST_REDUCTION - 1) + 1


def mit_encoder(name: str) -> nn.Module:
    """smp's MiT encoder ``name`` (``mit_b0`` ... ``mit_b5``), randomly initialised: nothing is downloaded."""
    from segmentation_models_pytorch.encoders import get_encoder

    return get_encoder(name, in_channels=3, depth=5, weights=None)


def pack_levels(levels: Sequence[Tensor]) -> Tensor:
    """The encoder levels (finest first) upsampled to the finest one's size, concatenated on channels."""
    size = levels[0].shape[-2:]
    up = [lv if lv.shape[-2:] == size else F.interpolate(lv, size=size, mode="bilinear", align_corners=False)
          for lv in levels]  # fmt: skip
    return torch.cat(up, dim=1)


def unpack_levels(packed: Tensor, channels: Sequence[int]) -> list[Tensor]:
    return list(packed.split(list(channels), dim=1))


class MiTSegmenter(Segmenter):
    """A MiT encoder and a head that reads its four levels (SegFormer's or DAFormer's)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = encoder
        self.classifier = head
        self.level_channels = tuple(int(c) for c in encoder.out_channels[2:])  # smp: [3, 0, C1, C2, C3, C4]

    @property
    def feature_channels(self) -> int:
        return sum(self.level_channels)

    def _features(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < MIN_SIDE:  # torch's own error names kernel sizes, not the image
            raise ValueError(
                f"a MiT encoder needs images of at least {MIN_SIDE} pixels a side, got {tuple(x.shape[-2:])} "
                "(an hrda_ model passes it half the side)"
            )
        return pack_levels(self.backbone(x)[2:])

    def decode(self, feats: Tensor) -> Tensor:
        return self.classifier(unpack_levels(feats, self.level_channels))


class SegFormerHead(nn.Module):
    """smp's SegFormer decoder (per-level linear embedding, 1x1 fuse + BN + ReLU), dropout, classifier."""

    def __init__(self, level_channels: Sequence[int], width: int, num_classes: int) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder

        self.decoder = SegformerDecoder([3, 0, *level_channels], encoder_depth=5, segmentation_channels=width)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.conv_seg = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        # smp's stages run coarsest level first, and so does the concatenation of the original head.
        embedded = [stage(level) for stage, level in zip(self.decoder.mlp_stage, reversed(levels), strict=True)]
        return self.conv_seg(self.dropout(self.decoder.fuse_stage(torch.cat(embedded, dim=1))))


def build_segformer(num_classes: int, options: MiTOptions) -> MiTSegmenter:
    encoder = mit_encoder(options.encoder)
    return MiTSegmenter(encoder, SegFormerHead(encoder.out_channels[2:], options.head_width, num_classes))
