"""Plain pseudo-label self-training on the target images: no mixing, no source.

The baseline the mixing methods must beat: the student learns the teacher's arg-max
labels, each image weighted by its confident-pixel fraction. Without source labels or
mixing nothing stops the model confirming its own errors; that is what it measures.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from clients.adaptation.configs import SelfTrainConfig
from clients.adaptation.context import AdaptContext
from clients.adaptation.losses import pseudo_labels, weighted_cross_entropy
from clients.adaptation.mixing import StrongAugment
from clients.adaptation.norm import refresh_statistics, set_bn_mode
from clients.adaptation.sampling import target_batch, uniform_indices
from clients.adaptation.teacher_student import run_teacher_student, start_teacher_student
from common.device.runtime import model_device
from common.models.segmenter import Segmenter

__all__ = ["SelfTrainConfig", "adapt"]


def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: SelfTrainConfig) -> None:
    state, teacher = start_teacher_student(model, target, config, context, ema_max=None if config.ema else 0.0)
    optimizer, precision = state.optimizer, state.precision
    augment = StrongAugment()
    device = model_device(model)

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        refresh_statistics(t, config.bn_refresh, teacher.model, model, config.bn, target)
        images = target_batch(target, uniform_indices(len(target), config.batch_size, gen), device)
        with precision.autocast():
            labels, weights = pseudo_labels(teacher.probs(images), config.threshold)
        if config.augment:
            images = augment(images, gen)
        set_bn_mode(model, config.bn)
        with precision.autocast():
            logits = model(images)
            loss = weighted_cross_entropy(logits, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        teacher.update(model, t)
        # The weighted loss can rise while the model learns, as the weights (confidence) grow;
        # the unweighted CE against the current pseudo-labels is the cleaner progress signal.
        ce = weighted_cross_entropy(logits.detach().float(), labels, torch.ones_like(weights))
        return {"loss": loss.item(), "ce": ce.item(), "confident": float(weights.mean())}

    run_teacher_student(state, step, context, config, "selftrain", len(target))
    model.eval()
