"""Tent: train only the BN scales and shifts to minimise prediction entropy (Wang et al., 2021).

A baseline with the smallest possible footprint: everything but the BN affine parameters
stays at the source weights. BN runs on batch statistics while training, so Tent leaves
no usable running statistics; the site's exact statistics pass afterwards provides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from clients.adaptation.loop import TrainState, run_training
from clients.adaptation.losses import confident_fraction, normalized_entropy
from clients.adaptation.norm import bn_affine_parameters
from clients.adaptation.optim import Schedule
from clients.adaptation.registry import AdaptContext, register
from clients.adaptation.sampling import target_batch, uniform_indices
from common.models import Segmenter
from common.predictions import CONFIDENCE_THRESHOLD

__all__ = ["TentConfig", "adapt"]


@dataclass(frozen=True)
class TentConfig:
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


@register("tent", TentConfig, summary="BN affine parameters by entropy minimisation (Tent), BN in batch-stat mode")
def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: TentConfig) -> None:
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    params = bn_affine_parameters(model)
    if not params:
        raise ValueError("tent needs BatchNorm layers with affine parameters; the model has none")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999))
    state = TrainState(model, optimizer)

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        model.train()  # batch statistics in every BN layer
        images = target_batch(target, uniform_indices(len(target), config.batch_size, gen))
        probs = model(images).softmax(1)
        loss = normalized_entropy(probs).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "confident": float(confident_fraction(probs.detach(), config.threshold).mean())}

    try:
        run_training(
            state, step, Schedule(config.steps, warmup=0, power=0.0), context,
            name="tent", config=config, num_target=len(target), checkpoint_every=config.checkpoint_every,
        )  # fmt: skip
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.eval()
