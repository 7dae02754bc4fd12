"""Source pretraining: supervised training of a segmenter on one labeled domain.

This gives the source model every adaptation method starts from. It is deliberately plain
(AdamW, poly decay, cross-entropy, flip + scale-crop) so that differences between the
adaptation methods are not hidden behind a clever source recipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from common.checkpoints import save_checkpoint
from common.data import DataSpec, build_dataset, dataset_classes, make_loader
from common.data.classes import IGNORE
from common.data.transforms import TrainAugment
from common.model_factory import build_model
from common.models import Segmenter

__all__ = ["PretrainConfig", "PretrainPlan", "PretrainResult", "pretrain", "pretrain_to_file", "train_segmenter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "small_unet"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scale: tuple[float, float] = (0.75, 1.5)  # random rescale range; (1.0, 1.0) turns scale-crop off
    crop: tuple[int, int] | None = None  # training crop (H, W); None = the image size
    flip: bool = True
    warmup_steps: int = 50
    seed: int = 0
    num_classes: int | None = None  # None: from the dataset kind
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive (got {self.steps}, {self.batch_size})")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {self.scale}")


@dataclass(frozen=True)
class PretrainResult:
    losses: list[float]  # mean loss per logging window, for a look at convergence
    seconds: float


class _Augmented(Dataset):
    """Applies the random train transforms per item; the crop keeps batches stackable."""

    def __init__(self, base: Dataset, augment: TrainAugment) -> None:
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        image, label = self.base[idx]
        return self.augment(image, label)


def _forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


def _poly(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then polynomial (power 0.9) decay to zero: the usual segmentation schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return (1 - step / config.steps) ** 0.9


def train_segmenter(model: Segmenter, dataset: Dataset, config: PretrainConfig) -> PretrainResult:
    """Train ``model`` in place for ``config.steps`` steps on ``dataset`` (labels: train ids, 255 ignore)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training set is empty")
    torch.manual_seed(config.seed)
    data = _Augmented(dataset, TrainAugment(config.scale, config.flip, config.crop))
    batches = _forever(make_loader(data, config.batch_size, shuffle=True, seed=config.seed))
    model.to(config.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _poly(s, config))
    losses, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not config.progress, dynamic_ncols=True)
    for step in bar:
        images, labels = next(batches)
        images, labels = images.to(config.device), labels.to(config.device)
        loss = F.cross_entropy(model(images), labels, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == 20 or step == config.steps - 1:
            losses.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    model.cpu().eval()
    return PretrainResult(losses, time.perf_counter() - start)


def pretrain(spec: DataSpec, config: PretrainConfig) -> Segmenter:
    """A model of ``config.arch`` trained from scratch on the labeled set ``spec`` selects."""
    num_classes = config.num_classes or len(dataset_classes(spec.kind, spec.root))
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes)
    result = train_segmenter(model, build_dataset(spec), config)
    log.info("pretrained %s on %s: %d steps in %.0f s, final loss %.3f", config.arch, spec, config.steps,
             result.seconds, result.losses[-1])  # fmt: skip
    return model


@dataclass(frozen=True)
class PretrainPlan:
    """A source model to make when no checkpoint is at hand: what an experiment or preset names."""

    data: DataSpec
    arch: str = "small_unet"
    steps: int = 300
    batch_size: int = 8
    seed: int = 0

    def key(self) -> str:
        """Everything that decides the weights, for naming a cached checkpoint."""
        return f"{self.data}|{self.arch}|{self.steps}|{self.batch_size}|{self.seed}"


def pretrain_to_file(plan: PretrainPlan, path: str | Path, progress: bool = True) -> Path:
    """Pretrain by ``plan`` and write a ``checkpoint/1`` file that records the plan."""
    config = PretrainConfig(
        arch=plan.arch, steps=plan.steps, batch_size=plan.batch_size, seed=plan.seed, progress=progress
    )
    model = pretrain(plan.data, config)
    meta = {"data": str(plan.data), "steps": str(plan.steps), "seed": str(plan.seed)}
    return save_checkpoint(model, path, plan.arch, dataset_classes(plan.data.kind, plan.data.root), meta)
