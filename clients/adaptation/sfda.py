"""Source-free adaptation in the style of DAS3/ATP: no source image ever reaches the site.

Without source labels, the target set has to supply its own anchor. Images the teacher
finds easy (lowest mean entropy, 30 %) stand in for labeled source images: their arg-max
labels are pasted by ClassMix onto the hard images, whose own pseudo-labels are weighted
by confidence. Around that, three label-free terms on the hard images: focal entropy
(sharpen nearly-sure pixels), weighted diversity (do not collapse onto frequent classes)
and negative pseudo-labels (classes the teacher rules out). The classifier (final layer)
stays frozen, so the source's decision boundaries remain the reference the features are
pulled back to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from clients.adaptation.losses import (
    focal_entropy,
    negative_label_loss,
    normalized_entropy,
    pseudo_labels,
    weighted_cross_entropy,
    weighted_diversity,
)
from clients.adaptation.mixing import StrongAugment, class_mix
from clients.adaptation.norm import BN_PASS_BATCH, refresh_statistics, set_bn_mode
from clients.adaptation.registry import AdaptContext, register
from clients.adaptation.sampling import target_batch, uniform_indices
from clients.adaptation.teacher_student import TeacherStudentConfig, run_teacher_student, start_teacher_student
from common.data import image_batches
from common.models import Segmenter

__all__ = ["SFDAConfig", "adapt", "easy_split", "sfda_losses"]


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


@torch.no_grad()
def easy_split(teacher: Segmenter, target: Dataset, easy_fraction: float) -> Tensor:
    """Bool per target image: among the ``easy_fraction`` with the lowest mean normalised entropy.

    At least one image is easy and, when there are two or more, at least one is hard.
    """
    teacher.eval()
    scores = torch.cat(
        [normalized_entropy(teacher(x).softmax(1)).flatten(1).mean(1) for x in image_batches(target, BN_PASS_BATCH)]
    )
    n = len(scores)
    k = min(max(1, round(easy_fraction * n)), max(1, n - 1))
    easy = torch.zeros(n, dtype=torch.bool)
    easy[scores.argsort()[:k]] = True
    return easy


def sfda_losses(
    model: Segmenter,
    easy_images: Tensor,
    hard_images: Tensor,
    easy_probs: Tensor,
    hard_probs: Tensor,
    config: SFDAConfig,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """The student's loss terms for one easy and one hard batch, given the teacher's probabilities.

    "loss" is what is minimised: mix CE + negative_weight * negative + fe_weight * focal
    entropy - div_weight * diversity; "confident" is the hard images' pseudo-label weight.
    """
    hard_labels, hard_weights = pseudo_labels(hard_probs, config.threshold)
    mixed = class_mix(easy_images, easy_probs.argmax(1), hard_images, hard_labels, hard_weights, gen)
    images = StrongAugment()(mixed.images, gen) if config.augment else mixed.images
    mix_loss = weighted_cross_entropy(model(images), mixed.labels, mixed.weights)
    student = model(hard_images).softmax(1)
    fe = focal_entropy(student, config.focal_gamma)
    div = weighted_diversity(student, config.diversity_alpha)
    neg = negative_label_loss(student, hard_probs, config.negative_threshold)
    loss = mix_loss + config.negative_weight * neg + config.fe_weight * fe - config.div_weight * div
    return {
        "loss": loss,
        "mix": mix_loss.detach(),
        "negative": neg.detach(),
        "focal-entropy": fe.detach(),
        "diversity": div.detach(),
        "confident": hard_weights.mean(),
    }


def _pick(pool: Tensor, batch: int, gen: torch.Generator) -> list[int]:
    return [int(pool[i]) for i in uniform_indices(len(pool), batch, gen)]


@register("sfda", SFDAConfig, summary="source-free: easy-to-hard ClassMix, focal entropy, diversity, negative labels")
def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: SFDAConfig) -> None:
    classifier = model.final_layer()
    flags = [p.requires_grad for p in classifier.parameters()]
    classifier.requires_grad_(False)
    try:
        _adapt(model, target, context, config)
    finally:
        for p, flag in zip(classifier.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.eval()


def _adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: SFDAConfig) -> None:
    state, teacher = start_teacher_student(model, target, config)
    optimizer = state.optimizer
    state.extras["easy"] = easy_split(teacher.model, target, config.easy_fraction)

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        if refresh_statistics(t, config.bn_refresh, teacher.model, model, config.bn, target):
            state.extras["easy"] = easy_split(teacher.model, target, config.easy_fraction)
        easy = state.extras["easy"]
        hard_pool = torch.nonzero(~easy).flatten() if (~easy).any() else torch.arange(len(easy))
        easy_idx = _pick(torch.nonzero(easy).flatten(), config.batch_size, gen)
        hard_idx = _pick(hard_pool, config.batch_size, gen)
        easy_images, hard_images = target_batch(target, easy_idx), target_batch(target, hard_idx)
        probs = teacher.probs(torch.cat([easy_images, hard_images]))
        set_bn_mode(model, config.bn)
        terms = sfda_losses(model, easy_images, hard_images, *probs.split(config.batch_size), config, gen)
        loss = terms["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        teacher.update(model, t)
        return {k: v.item() for k, v in terms.items()}

    run_teacher_student(state, step, context, config, "sfda", len(target))
