"""HRDA's multi-resolution segmenter around any base model (Hoyer et al., 2022).

A low-resolution *context* view (the whole image at scale 0.5) sees the layout; a
full-resolution *detail* view (crops of half the side) sees small objects; a learned
class-wise *scale attention* a = sigmoid(head(context features)) decides per pixel and
class which to trust: fused = a * detail + (1 - a) * context, on logits.

The attention head is an ordinary module of the model, so its weights are merged like
the rest and the whole federation shares the ``hrda_<base>`` architecture. ``forward``
gives the fused prediction with sliding-window detail inference over the whole image,
so evaluation and statistics code need no special case. The base model keeps its own
state-dict keys under ``base.``; a plain base checkpoint loads into it and gets a freshly
(but deterministically) initialised attention head, so every site that wraps the same
source checkpoint starts from the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.base import build_base_model
from common.models.catalog import HRDA_PREFIX
from common.models.segmenter import Segmenter
from common.models.weights import load_weights_file

__all__ = [
    "HRDA_PREFIX",
    "Box",
    "MultiResConfig",
    "MultiResSegmenter",
    "build_multires",
    "fuse_scales",
    "random_box",
    "sliding_windows",
]

ATTENTION_SEED = 0  # the fresh attention head is the same on every site that wraps the same base


@dataclass(frozen=True)
class Box:
    """A crop: top row, left column, height, width (full-resolution pixels)."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class MultiResConfig:
    """HRDA's geometry. Defaults: context at scale 0.5; detail crops of half the image side,
    slid with a stride of half the crop at inference (3 x 3 windows)."""

    context_scale: float = 0.5
    detail_fraction: float = 0.5
    stride_fraction: float = 0.5

    def detail_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, round(height * self.detail_fraction)), max(1, round(width * self.detail_fraction))


def fuse_scales(context: Tensor, detail: Tensor, attention: Tensor, box: Box) -> Tensor:
    """a * detail + (1 - a) * context inside ``box``; the context alone outside it.

    ``context`` and ``attention`` are at full resolution [B, C, H, W], ``detail`` covers
    only the box [B, C, box.height, box.width]. Outside the box there is no detail view,
    so the attention counts as zero there (as in HRDA's training).
    """
    rows, cols = box.slices()
    fused = context.clone()
    a = attention[:, :, rows, cols]
    fused[:, :, rows, cols] = a * detail + (1.0 - a) * context[:, :, rows, cols]
    return fused


def _positions(size: int, crop: int, stride: int) -> list[int]:
    last = size - crop
    out = list(range(0, last + 1, max(stride, 1)))
    if out[-1] != last:
        out.append(last)
    return out


def sliding_windows(height: int, width: int, config: MultiResConfig) -> list[Box]:
    """The detail windows that tile the image with overlap (crop = half side, stride = crop/2)."""
    ch, cw = config.detail_size(height, width)
    sh, sw = round(ch * config.stride_fraction), round(cw * config.stride_fraction)
    return [Box(t, left, ch, cw) for t in _positions(height, ch, sh) for left in _positions(width, cw, sw)]


def _attention_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """A light head on the context features: one class-wise attention logit per pixel."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ATTENTION_SEED)
        head = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_classes, 1),
        )
    return head


class MultiResSegmenter(Segmenter):
    """Context + detail + scale attention around ``base``; see the module docstring."""

    def __init__(self, base: Segmenter, num_classes: int, config: MultiResConfig = MultiResConfig()) -> None:
        super().__init__()
        self.base = base
        self.attention = _attention_head(base.feature_channels, num_classes)
        self.config = config

    # -- the Segmenter interface, delegated to the base where it is the base's business
    @property
    def feature_channels(self) -> int:
        return self.base.feature_channels

    def features(self, x: Tensor) -> Tensor:
        return self.base.features(x)

    def decode(self, feats: Tensor) -> Tensor:
        return self.base.decode(feats)

    def final_layer(self) -> nn.Conv2d:
        return self.base.final_layer()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.base.head_parameters()
        yield from self.attention.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.base.backbone_parameters()

    # -- the two views
    def context(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Context logits and attention (sigmoid), both upsampled to the input resolution."""
        h, w = x.shape[-2:]
        small = F.interpolate(x, scale_factor=self.config.context_scale, mode="bilinear", align_corners=False)
        feats = self.base.features(small)
        logits = self.base.decode(feats)
        attention = torch.sigmoid(self.attention(feats))
        up = dict(size=(h, w), mode="bilinear", align_corners=False)
        return F.interpolate(logits, **up), F.interpolate(attention, **up)

    def detail(self, x: Tensor, box: Box) -> Tensor:
        rows, cols = box.slices()
        return self.base(x[:, :, rows, cols])

    def sliding_detail(self, x: Tensor) -> Tensor:
        """Full-resolution logits from overlapping detail windows, averaged where they overlap.

        All windows go through the base in ONE batch, so in batch-statistics mode (the
        exact BN pass, Tent) BN sees the whole image rather than one window at a time.
        """
        b, _, h, w = x.shape
        boxes = sliding_windows(h, w, self.config)
        crops = torch.cat([x[:, :, r, c] for r, c in (box.slices() for box in boxes)])
        logits = self.base(crops).split(b)
        out = x.new_zeros(b, logits[0].shape[1], h, w)
        count = x.new_zeros(1, 1, h, w)
        for box, part in zip(boxes, logits, strict=True):
            rows, cols = box.slices()
            out[:, :, rows, cols] += part
            count[:, :, rows, cols] += 1
        return out / count

    def forward(self, x: Tensor) -> Tensor:
        context, attention = self.context(x)
        detail = self.sliding_detail(x)
        return attention * detail + (1.0 - attention) * context

    def train_forward(self, x: Tensor, box: Box) -> tuple[Tensor, Tensor]:
        """(fused logits at full resolution, detail logits of ``box``) for one training crop."""
        context, attention = self.context(x)
        detail = self.detail(x, box)
        return fuse_scales(context, detail, attention, box), detail


def random_box(height: int, width: int, config: MultiResConfig, generator: torch.Generator) -> Box:
    """A uniformly placed detail crop of the configured size."""
    ch, cw = config.detail_size(height, width)
    top = int(torch.randint(height - ch + 1, (1,), generator=generator, device=generator.device))
    left = int(torch.randint(width - cw + 1, (1,), generator=generator, device=generator.device))
    return Box(top, left, ch, cw)


def build_multires(
    base_arch: str,
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
) -> MultiResSegmenter:
    """``hrda_<base_arch>``: ``weights`` may be a wrapped checkpoint or a plain ``base_arch`` one.

    A plain one loads into the base and the attention head starts fresh (seeded, so the
    same on every site); a wrapped one (keys ``base.*`` and ``attention.*``) loads whole.
    """
    if base_arch.startswith(HRDA_PREFIX):
        raise ValueError(f"{HRDA_PREFIX}{base_arch}: a multi-resolution model cannot wrap another")
    if weights is None:
        return MultiResSegmenter(
            build_base_model(base_arch, num_classes, backbone_weights=backbone_weights), num_classes
        )
    state = load_weights_file(weights)
    if not any(k.startswith("attention.") for k in state):
        base = build_base_model(base_arch, num_classes, weights=weights, backbone_weights=backbone_weights)
        return MultiResSegmenter(base, num_classes)
    model = MultiResSegmenter(build_base_model(base_arch, num_classes, backbone_weights=backbone_weights), num_classes)
    state = {k: v for k, v in state.items() if not k.endswith(".num_samples")}
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if bad or missing or unexpected:
        raise ValueError(
            f"{weights}: not a {HRDA_PREFIX}{base_arch} checkpoint with {num_classes} classes "
            f"({len(bad)} shape mismatches, {len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    model.load_state_dict(state)
    return model
