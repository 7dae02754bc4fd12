"""The registry of adaptation methods: each method's typed, documented options, readable without torch.

A config file or a command line names a method and its options long before anything trains;
keeping the option types apart from the training code lets them be checked at once, in a
process that never imports torch. The defaults are each method's documented recipe. A
method is a function ``adapt(model, target, context, config)`` that changes ``model`` in
place on the site's unlabeled images, named by its entry's ``target`` and imported when a
site first runs it; every method is followed by the exact BN statistics pass
(``clients.site``), so methods need not care about running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from common.options.registry import Registry
from common.scoring.confidence import CONFIDENCE_THRESHOLD

__all__ = [
    "BN_MODES",
    "METHODS",
    "AdaBNConfig",
    "HRDAConfig",
    "MethodConfig",
    "SFDAConfig",
    "SelfTrainConfig",
    "TeacherStudentConfig",
    "TentConfig",
    "check_bn_mode",
]

METHODS = Registry("adaptation method")

BN_MODES = ("train", "frozen")


def check_bn_mode(mode: str) -> str:
    if mode not in BN_MODES:
        raise ValueError(f"bn mode must be one of {', '.join(BN_MODES)}, not {mode!r}")
    return mode


@dataclass(frozen=True)
class MethodConfig:
    """What every method declares besides its options."""

    needs_source: ClassVar[bool] = False  # the site must hold the labeled source set


@METHODS.register("adabn", target="clients.adaptation.adabn:adapt",
                  summary="re-estimate BN statistics on the target images; nothing else")  # fmt: skip
@dataclass(frozen=True)
class AdaBNConfig(MethodConfig):
    """No options: the re-estimation itself is the method."""


@METHODS.register("tent", target="clients.adaptation.tent:adapt",
                  summary="BN affine parameters by entropy minimisation (Tent), BN in batch-stat mode")  # fmt: skip
@dataclass(frozen=True)
class TentConfig(MethodConfig):
    """Defaults: the Tent recipe (Adam, lr 1e-3, BN in batch-statistics mode).

    steps: optimisation steps (each on ``batch_size`` random target images), 100.
    batch_size: target images per step, 4 (batch statistics need a few images).
    lr: Adam learning rate on the BN affine parameters, 1e-3.
    threshold: confidence threshold of the reported confident-pixel fraction (``CONFIDENCE_THRESHOLD``).
    checkpoint_every: steps between resumable checkpoints (with a checkpoint dir), 50.
    """

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    threshold: float = CONFIDENCE_THRESHOLD
    checkpoint_every: int = 50


@dataclass(frozen=True)
class TeacherStudentConfig(MethodConfig):
    """The options every mean-teacher method has (each method documents its own defaults)."""

    steps: int = 600
    batch_size: int = 2
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 50
    threshold: float = CONFIDENCE_THRESHOLD
    ema_max: float = 0.999
    bn: str = "train"
    bn_refresh: int = 100
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_bn_mode(self.bn)


@METHODS.register("selftrain", target="clients.adaptation.selftrain:adapt",
                  summary="pseudo-label self-training on the target, no mixing (EMA teacher)")  # fmt: skip
@dataclass(frozen=True)
class SelfTrainConfig(TeacherStudentConfig):
    """Defaults follow the DAFormer self-training recipe, scaled to a short CPU run.

    steps: optimisation steps, 600.
    batch_size: target images per step, 2.
    lr: AdamW learning rate of the backbone, 1e-4 (head x``head_lr_mult``).
    head_lr_mult: decode-head learning-rate factor, 10.
    weight_decay: AdamW weight decay, 0.01.
    warmup: linear warm-up steps before the poly decay, 50.
    threshold: probability that makes a pixel confident (``CONFIDENCE_THRESHOLD``).
    ema: pseudo-labels from an EMA teacher (True) or from the student itself (False).
    ema_max: the EMA's alpha cap, 0.999.
    augment: strong augmentation (colour jitter, blur) of the student's input, off.
    bn: student BN mode, "train" (batch statistics) or "frozen" (exact target statistics).
    bn_refresh: steps between re-measuring the target statistics of the teacher
        (and of a frozen-BN student), 100.
    checkpoint_every: steps between resumable checkpoints (with a checkpoint dir), 100.
    """

    ema: bool = True
    augment: bool = False


@METHODS.register("sfda", target="clients.adaptation.sfda:adapt",
                  summary="source-free: easy-to-hard ClassMix, focal entropy, diversity, negative labels")  # fmt: skip
@dataclass(frozen=True)
class SFDAConfig(TeacherStudentConfig):
    """Defaults follow the DAS3/ATP code, except a short, gentle run without strong augmentation.

    The exceptions were measured on CamVid dusk (0001TP, adapting on frames 1-30 and scoring
    on frames 31-42, never the evaluation frames), against AdaBN's 32.6 mIoU: 100 steps with
    augmentation gave 27.7; without it, 35.0 and 35.6 (two seeds) at lr 1e-4, but 27.9 on
    the real split (all 42 frames, scored on the last 20), and 29.9 at 300 steps; at lr
    3e-5, 34.3 and 34.1. Without source labels nothing anchors the run: it drifts to its
    own confident mistakes, faster with a higher rate or jittered colours on dark images.

    steps: optimisation steps, 100.
    batch_size: easy and hard images per step (each), 2.
    lr: AdamW learning rate of the backbone, 3e-5 (head x``head_lr_mult``; final layer frozen).
    head_lr_mult: decode-head learning-rate factor, 10.
    weight_decay: AdamW weight decay, 0.01.
    warmup: linear warm-up steps before the poly decay, 50.
    threshold: probability that makes a pixel confident (hard images' weight, ``CONFIDENCE_THRESHOLD``).
    ema_max: the EMA teacher's alpha cap, 0.999.
    easy_fraction: share of target images ranked easy by the teacher's mean entropy, 0.3.
    focal_gamma: focal-entropy exponent, 5.
    diversity_alpha: confidence weight exp(-alpha H) of the diversity term, 3.
    fe_weight: focal-entropy weight, 0.001.
    div_weight: weighted-diversity weight (subtracted: diversity is maximised), 0.0001.
    negative_threshold: a class below this teacher probability is a negative label, 0.04.
    negative_weight: negative-label loss weight, 1.
    augment: strong augmentation (colour jitter, blur) of the mixed images, off.
    bn: student BN mode, "train" (batch statistics) or "frozen" (exact target statistics).
    bn_refresh: steps between re-measuring the teacher's target statistics and re-ranking
        easy/hard, 100.
    checkpoint_every: steps between resumable checkpoints (with a checkpoint dir), 100.
    """

    steps: int = 100
    lr: float = 3e-5
    easy_fraction: float = 0.3
    focal_gamma: float = 5.0
    diversity_alpha: float = 3.0
    fe_weight: float = 0.001
    div_weight: float = 0.0001
    negative_threshold: float = 0.04
    negative_weight: float = 1.0
    augment: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.easy_fraction < 1.0:
            raise ValueError(f"easy_fraction must be in (0, 1), not {self.easy_fraction}")


@METHODS.register("hrda", target="clients.adaptation.hrda:adapt",
                  summary="HRDA/DAFormer: source + ClassMix self-training, multi-res")  # fmt: skip
@dataclass(frozen=True)
class HRDAConfig(TeacherStudentConfig):
    """Defaults follow HRDA/DAFormer, with the step budget of a short CPU run.

    steps: optimisation steps (one source and one mixed batch each), 1000.
    batch_size: source images and target images per step (each), 2.
    lr: AdamW learning rate of the backbone, 1e-4 (head and attention x``head_lr_mult``).
    head_lr_mult: decode-head learning-rate factor, 10.
    weight_decay: AdamW weight decay, 0.01.
    warmup: linear warm-up steps before the poly decay, 100.
    threshold: probability that makes a pixel confident (pseudo-label weight, ``CONFIDENCE_THRESHOLD``).
    ema_max: the EMA teacher's alpha cap, 0.999.
    detail_weight: weight of the loss on the detail crop alone, 0.1.
    rcs: rare class sampling of source images, on.
    rcs_temperature: RCS temperature T, 0.01.
    rcs_min_pixels: pixels of a class an image needs to be drawn for it, 3000 at 512x512
        (scaled by image area).
    fd_weight: ImageNet feature-distance weight, 0.005; used only when the site has
        backbone weights (``AdaptContext.backbone_weights``).
    fd_classes: class ids (comma-separated) whose source pixels the feature distance covers,
        "" = every labeled pixel (DAFormer uses the "thing" classes of Cityscapes).
    augment: strong augmentation (colour jitter, blur) of the mixed images, on.
    flip: random horizontal flips of the source and target images, on.
    bn: student BN mode, "train" (batch statistics) or "frozen" (exact target statistics).
    bn_refresh: steps between re-measuring the teacher's target statistics, 100.
    checkpoint_every: steps between resumable checkpoints (with a checkpoint dir), 100.
    crop: "HxW": every source and target image is cut to a random window of that size before
        anything else (HRDA trains on 1024x1024 windows of 1024x2048 Cityscapes frames), one window
        per image; "" (default) trains on whole images.
    """

    needs_source: ClassVar[bool] = True
    steps: int = 1000
    warmup: int = 100
    detail_weight: float = 0.1
    rcs: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    fd_weight: float = 0.005
    fd_classes: str = ""
    augment: bool = True
    flip: bool = True
    crop: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.crop_size()  # a malformed crop fails where it is written

    def __repr__(self) -> str:
        """The dataclass repr, naming ``crop`` only when set: cache keys made before it existed stay valid."""
        shown = (f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "crop" or self.crop)
        return f"{type(self).__name__}({', '.join(shown)})"

    def fd_class_ids(self) -> list[int]:
        return [int(c) for c in self.fd_classes.replace(" ", "").split(",") if c]

    def crop_size(self) -> tuple[int, int] | None:
        """``crop`` as (height, width), or None for whole images."""
        if not self.crop:
            return None
        height, sep, width = self.crop.lower().partition("x")
        if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
            raise ValueError(f"hrda crop must be HxW with positive integers (1024x1024) or empty, not {self.crop!r}")
        return int(height), int(width)
