"""Plain pseudo-label self-training on the target images: no mixing, no source.

The baseline the mixing methods must beat: the student learns the teacher's arg-max
labels, each image weighted by its confident-pixel fraction. Without source labels or
mixing nothing stops the model confirming its own errors; that is what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from clients.adaptation.ema import EMATeacher
from clients.adaptation.loop import TrainState, run_training
from clients.adaptation.losses import pseudo_labels, weighted_cross_entropy
from clients.adaptation.mixing import StrongAugment
from clients.adaptation.norm import check_bn_mode, refresh_bn, refresh_statistics, set_bn_mode
from clients.adaptation.optim import Schedule, build_optimizer
from clients.adaptation.registry import AdaptContext, register
from clients.adaptation.sampling import target_batch, uniform_indices
from common.models import Segmenter

__all__ = ["SelfTrainConfig", "adapt"]


@dataclass(frozen=True)
class SelfTrainConfig:
    """Defaults follow the DAFormer self-training recipe, scaled to a short CPU run.

    steps: optimisation steps, 600.
    batch_size: target images per step, 2.
    lr: AdamW learning rate of the backbone, 1e-4 (head x``head_lr_mult``).
    head_lr_mult: decode-head learning-rate factor, 10.
    weight_decay: AdamW weight decay, 0.01.
    warmup: linear warm-up steps before the poly decay, 50.
    threshold: probability that makes a pixel confident, 0.968.
    ema: pseudo-labels from an EMA teacher (True) or from the student itself (False).
    ema_max: the EMA's alpha cap, 0.999.
    augment: strong augmentation (colour jitter, blur) of the student's input, off.
    bn: student BN mode, "train" (batch statistics) or "frozen" (exact target statistics).
    bn_refresh: steps between re-measuring the target statistics of the teacher
        (and of a frozen-BN student), 100.
    checkpoint_every: steps between resumable checkpoints (with a checkpoint dir), 100.
    """

    steps: int = 600
    batch_size: int = 2
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 50
    threshold: float = 0.968
    ema: bool = True
    ema_max: float = 0.999
    augment: bool = False
    bn: str = "train"
    bn_refresh: int = 100
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_bn_mode(self.bn)


@register("selftrain", SelfTrainConfig, summary="pseudo-label self-training on the target, no mixing (EMA teacher)")
def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: SelfTrainConfig) -> None:
    refresh_bn(model, target)  # start from AdaBN: the teacher's first labels see target statistics
    teacher = EMATeacher(model, config.ema_max if config.ema else 0.0)
    optimizer = build_optimizer(model, config.lr, config.head_lr_mult, config.weight_decay)
    state = TrainState(model, optimizer, teacher)
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

    run_training(
        state, step, Schedule(config.steps, config.warmup), context,
        name="selftrain", config=config, num_target=len(target), checkpoint_every=config.checkpoint_every,
    )  # fmt: skip
    model.eval()
