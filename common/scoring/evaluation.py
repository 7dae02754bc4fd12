"""Evaluate a segmentation model on labeled sets, one domain at a time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.bn.bank import BNBank
from common.data import DataSpec, build_dataset, make_loader
from common.device.runtime import autocast, model_device
from common.device.spec import Compute
from common.models.banked import BankedSegmenter
from common.models.factory import build_model
from common.scoring.metrics import confusion_matrix, harmonic_mean, mean_iou, per_class_iou

__all__ = ["DomainScore", "StateEvaluator", "evaluate_domain", "evaluate_domains"]


@dataclass(frozen=True)
class DomainScore:
    miou: float
    per_class: list[float]
    num_images: int


@torch.no_grad()
def evaluate_domain(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    desc: str = "",
    progress: bool = False,
    amp: str = "off",
) -> DomainScore:
    """mIoU of ``model`` (in eval mode) on (image, label) batches, counted on the model's device under ``amp``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    n = 0
    try:
        for images, labels in tqdm(batches, desc=f"eval {desc}", disable=not progress, leave=False):
            with autocast(device, amp):
                predicted = model(images.to(device)).argmax(1)
            conf += confusion_matrix(predicted, labels.to(device), num_classes)
            n += images.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"evaluation set {desc!r} is empty")
    conf = conf.cpu()
    return DomainScore(mean_iou(conf), [float(v) for v in per_class_iou(conf)], n)


def evaluate_domains(
    model: nn.Module,
    loaders: Mapping[str, Iterable[tuple[Tensor, Tensor]]],
    num_classes: int,
    progress: bool = False,
    amp: str = "off",
) -> tuple[dict[str, DomainScore], float]:
    """Per-domain scores and the harmonic mean H of their mIoU."""
    scores = {d: evaluate_domain(model, b, num_classes, d, progress, amp) for d, b in loaders.items()}
    return scores, harmonic_mean({d: s.miou for d, s in scores.items()})


class StateEvaluator:
    """Scores state dicts of one architecture on fixed labeled sets, built once and reused."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        specs: Mapping[str, DataSpec],
        batch_size: int = 8,
        progress: bool = False,
        compute: Compute = Compute(),
    ) -> None:
        """``compute``: a resolved device (``common.device.runtime.resolve_compute``) and the evaluation's amp."""
        self.model = build_model(arch, num_classes).to(compute.device)
        self.num_classes = num_classes
        self.loaders = {d: make_loader(build_dataset(spec), batch_size) for d, spec in specs.items()}
        self.progress = progress
        self.amp = compute.amp

    def __call__(self, state: Mapping[str, Tensor], bank: BNBank | None = None) -> dict[str, object]:
        """The report's ``eval`` section: per-domain mIoU (and per class) and H; ``bank`` picks BN statistics."""
        self.model.load_state_dict(dict(state), strict=True)
        model = BankedSegmenter(self.model, bank).eval() if bank is not None else self.model
        scores, h = evaluate_domains(model, self.loaders, self.num_classes, self.progress, self.amp)
        return {
            "per_domain": {d: s.miou for d, s in scores.items()},
            "per_class": {d: s.per_class for d, s in scores.items()},
            "num_images": {d: s.num_images for d, s in scores.items()},
            "harmonic_mean": h,
        }
