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

import torch
from torch import Tensor
from torch.utils.data import Dataset

from clients.adaptation.configs import SFDAConfig
from clients.adaptation.context import AdaptContext
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
from clients.adaptation.sampling import target_batch, uniform_indices
from clients.adaptation.teacher_student import run_teacher_student, start_teacher_student
from common.data import image_batches
from common.device.runtime import Precision, model_device
from common.models.segmenter import Segmenter

__all__ = ["SFDAConfig", "adapt", "easy_split", "sfda_losses"]


@torch.no_grad()
def easy_split(teacher: Segmenter, target: Dataset, easy_fraction: float) -> Tensor:
    """Bool per target image: among the ``easy_fraction`` with the lowest mean normalised entropy.

    At least one image is easy and, when there are two or more, at least one is hard.
    """
    teacher.eval()
    device = model_device(teacher)
    scores = torch.cat(
        [
            normalized_entropy(teacher(x.to(device)).softmax(1)).flatten(1).mean(1)
            for x in image_batches(target, BN_PASS_BATCH)
        ]
    ).cpu()  # the split is bookkeeping of the data, which lies on the CPU
    n = len(scores)
    k = min(max(1, round(easy_fraction * n)), max(1, n - 1))
    easy = torch.zeros(n, dtype=torch.bool, device="cpu")
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
    precision: Precision | None = None,
) -> dict[str, Tensor]:
    """The student's loss terms for one easy and one hard batch, given the teacher's probabilities.

    "loss" is what is minimised: mix CE + negative_weight * negative + fe_weight * focal
    entropy - div_weight * diversity; "confident" is the hard images' pseudo-label weight.
    The student's forwards and losses run under ``precision``'s autocast; mixing and
    augmenting the images stay at full precision.
    """
    precision = precision or Precision(hard_images.device)
    hard_labels, hard_weights = pseudo_labels(hard_probs, config.threshold)
    mixed = class_mix(easy_images, easy_probs.argmax(1), hard_images, hard_labels, hard_weights, gen)
    images = StrongAugment()(mixed.images, gen) if config.augment else mixed.images
    with precision.autocast():
        mix_loss = weighted_cross_entropy(model(images), mixed.labels, mixed.weights)
        student = model(hard_images).float().softmax(1)
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
    state, teacher = start_teacher_student(model, target, config, context)
    optimizer, precision = state.optimizer, state.precision
    state.extras["easy"] = easy_split(teacher.model, target, config.easy_fraction)
    device = model_device(model)

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        if refresh_statistics(t, config.bn_refresh, teacher.model, model, config.bn, target):
            state.extras["easy"] = easy_split(teacher.model, target, config.easy_fraction)
        easy = state.extras["easy"]
        hard_pool = torch.nonzero(~easy).flatten() if (~easy).any() else torch.arange(len(easy), device=easy.device)
        easy_idx = _pick(torch.nonzero(easy).flatten(), config.batch_size, gen)
        hard_idx = _pick(hard_pool, config.batch_size, gen)
        easy_images, hard_images = target_batch(target, easy_idx, device), target_batch(target, hard_idx, device)
        with precision.autocast():
            probs = teacher.probs(torch.cat([easy_images, hard_images]))
        set_bn_mode(model, config.bn)
        terms = sfda_losses(model, easy_images, hard_images, *probs.split(config.batch_size), config, gen, precision)
        loss = terms["loss"]
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        teacher.update(model, t)
        return {k: v.item() for k, v in terms.items()}

    run_teacher_student(state, step, context, config, "sfda", len(target))
