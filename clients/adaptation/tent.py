"""Tent: train only the BN scales and shifts to minimise prediction entropy (Wang et al., 2021).

A baseline with the smallest possible footprint: everything but the BN affine parameters
stays at the source weights. BN runs on batch statistics while training, so Tent leaves
no usable running statistics; the site's exact statistics pass afterwards provides them.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from clients.adaptation.configs import TentConfig
from clients.adaptation.context import AdaptContext
from clients.adaptation.loop import TrainState, run_training, training_precision
from clients.adaptation.losses import confident_fraction, normalized_entropy
from clients.adaptation.norm import bn_affine_parameters
from clients.adaptation.optim import Schedule
from clients.adaptation.sampling import target_batch, uniform_indices
from common.device.runtime import model_device
from common.models.segmenter import Segmenter

__all__ = ["TentConfig", "adapt"]


def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: TentConfig) -> None:
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    params = bn_affine_parameters(model)
    if not params:
        raise ValueError("tent needs BatchNorm layers with affine parameters; the model has none")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999))
    precision = training_precision(model, context)
    state = TrainState(model, optimizer, precision=precision)
    device = model_device(model)

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        model.train()  # batch statistics in every BN layer
        images = target_batch(target, uniform_indices(len(target), config.batch_size, gen), device)
        with precision.autocast():
            probs = model(images).float().softmax(1)
            loss = normalized_entropy(probs).mean()
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
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
