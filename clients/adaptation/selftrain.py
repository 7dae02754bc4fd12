"""Plain pseudo-label self-training on the target images: no mixing, no source.

The baseline the mixing methods must beat: the student learns the teacher's arg-max
labels, each image weighted by its confident-pixel fraction. Without source labels or
mixing nothing stops the model confirming its own errors; that is what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from clients.adaptation.losses import pseudo_labels, weighted_cross_entropy
from clients.adaptation.mixing import StrongAugment
from clients.adaptation.norm import refresh_statistics, set_bn_mode
from clients.adaptation.registry import AdaptContext, register
from clients.adaptation.sampling import target_batch, uniform_indices
from clients.adaptation.teacher_student import TeacherStudentConfig, run_teacher_student, start_teacher_student
from common.models import Segmenter

__all__ = ["SelfTrainConfig", "adapt"]


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


@register("selftrain", SelfTrainConfig, summary="pseudo-label self-training on the target, no mixing (EMA teacher)")
def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: SelfTrainConfig) -> None:
    state, teacher = start_teacher_student(model, target, config, ema_max=None if config.ema else 0.0)
    optimizer = state.optimizer
    augment = StrongAugment()

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        refresh_statistics(t, config.bn_refresh, teacher.model, model, config.bn, target)
        images = target_batch(target, uniform_indices(len(target), config.batch_size, gen))
        labels, weights = pseudo_labels(teacher.probs(images), config.threshold)
        if config.augment:
            images = augment(images, gen)
        set_bn_mode(model, config.bn)
        logits = model(images)
        loss = weighted_cross_entropy(logits, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        teacher.update(model, t)
        # The weighted loss can rise while the model learns, as the weights (confidence) grow;
        # the unweighted CE against the current pseudo-labels is the cleaner progress signal.
        ce = weighted_cross_entropy(logits.detach(), labels, torch.ones_like(weights))
        return {"loss": loss.item(), "ce": ce.item(), "confident": float(weights.mean())}

    run_teacher_student(state, step, context, config, "selftrain", len(target))
    model.eval()
