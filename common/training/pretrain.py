"""Source pretraining: supervised training of a segmenter on one labeled domain.

This gives the source model every adaptation method starts from. By default it is plain
(AdamW, poly decay, cross-entropy, flip + scale-crop); the options for photometric jitter,
class-balanced and hard-pixel loss are off unless asked for, so existing callers keep their
source models. ``benchmarks/pretrain_camvid.py`` measures what each option buys on CamVid.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from common.data import DataSpec, build_dataset, dataset_classes, make_loader
from common.data.classes import IGNORE
from common.data.transforms import PhotometricAugment, TrainAugment
from common.device.runtime import Precision, resolve_device
from common.device.spec import check_amp
from common.models.catalog import check_arch
from common.models.checkpoints import save_checkpoint
from common.models.factory import build_model
from common.models.segmenter import Segmenter
from common.options.typed import build_options

__all__ = [
    "PretrainConfig",
    "PretrainPlan",
    "PretrainResult",
    "class_weights",
    "pretrain",
    "pretrain_to_file",
    "segmentation_loss",
    "train_segmenter",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """How to train a source model.

    The last options fight the two ways a plain source model fails its targets (all off by default):

    - ``photometric``: jitter the light of the source frames (image only). The targets differ from
      the source mostly in light (CamVid dusk is about half as bright), which a model trained on
      one light takes for a class cue.
    - ``class_weight_power``: weight each class's pixels by ``frequency ** -power`` (0 = plain CE,
      0.5 = inverse square root). Thin and rare classes (pole, sign, pedestrian) cover ~1 % of the
      pixels each, and with plain CE a short run never learns them: their IoU stays 0.
    - ``hard_pixel_fraction``: keep only this share of the labeled pixels with the highest loss in
      each batch (OHEM; 1.0 = every pixel), so easy sky and road stop dominating the gradient.
    - ``label_smoothing``: cross-entropy's smoothing; softer source predictions are better
      calibrated on a shifted target.
    """

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
    device: str = "cpu"  # auto, cpu, cuda or cuda:N (common.device)
    amp: str = "off"  # autocast precision of the training steps: off, bf16 or fp16
    progress: bool = True
    photometric: PhotometricAugment | None = None
    class_weight_power: float = 0.0
    hard_pixel_fraction: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_arch(self.arch)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive (got {self.steps}, {self.batch_size})")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {self.scale}")
        if not 0.0 <= self.class_weight_power <= 1.0:
            raise ValueError(f"class_weight_power must be in [0, 1], got {self.class_weight_power}")
        if not 0.0 < self.hard_pixel_fraction <= 1.0:
            raise ValueError(f"hard_pixel_fraction must be in (0, 1], got {self.hard_pixel_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_amp(self.amp)


@dataclass(frozen=True)
class PretrainResult:
    losses: list[float]  # mean loss per logging window, for a look at convergence
    seconds: float


class _Augmented(Dataset):
    """Applies the random train transforms per item; the crop keeps batches stackable."""

    def __init__(self, base: Dataset, augment: TrainAugment, photometric: PhotometricAugment | None = None) -> None:
        self.base, self.augment, self.photometric = base, augment, photometric

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        image, label = self.augment(*self.base[idx])
        if self.photometric is not None:
            image = self.photometric(image)
        return image, label


def class_weights(dataset: Dataset, num_classes: int, power: float) -> Tensor:
    """``frequency ** -power`` per class over the labeled pixels of ``dataset``, pixel-averaging to 1.

    The normalisation keeps the loss on the scale of plain CE, so the learning rate means the
    same with and without weights. A class absent from the labels gets the largest weight seen
    (it never occurs as a target, so the value only matters for a later dataset).
    """
    counts = torch.zeros(num_classes, dtype=torch.float64, device="cpu")  # with the labels
    for idx in range(len(dataset)):  # type: ignore[arg-type]
        label = dataset[idx][1]
        counts += torch.bincount(label[label != IGNORE].flatten(), minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise ValueError("the training set has no labeled pixels")
    freq = counts / counts.sum()
    present = freq > 0
    weights = freq.clamp_min(1e-12) ** -power
    weights = torch.where(present, weights, weights[present].max())
    return (weights / (freq * weights).sum()).to(torch.float32)


def segmentation_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    hard_pixel_fraction: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy over the labeled pixels, optionally class-weighted and over the hardest pixels only.

    With every pixel kept this is ``F.cross_entropy`` itself (a weighted mean when weighted),
    so the default matches plain training exactly.
    """
    if hard_pixel_fraction >= 1.0:
        return F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing)
    per_pixel = F.cross_entropy(
        logits, labels, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none"
    )
    values = per_pixel[labels != IGNORE]
    if values.numel() == 0:
        return per_pixel.sum() * 0.0  # keeps the graph: a batch of void only
    k = max(1, math.ceil(hard_pixel_fraction * values.numel()))
    return values.topk(k, sorted=False).values.mean()


def _forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


def _poly(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then polynomial (power 0.9) decay to zero: the usual segmentation schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return (1 - step / config.steps) ** 0.9


def train_segmenter(model: Segmenter, dataset: Dataset, config: PretrainConfig) -> PretrainResult:
    """Train ``model`` in place for ``config.steps`` steps on ``dataset`` (labels: train ids, 255 ignore).

    It trains on ``config.device`` and ends on the CPU, where a checkpoint is written from.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training set is empty")
    device = resolve_device(config.device)
    precision = Precision(device, config.amp)
    torch.manual_seed(config.seed)
    weight = None
    if config.class_weight_power > 0:
        num_classes = config.num_classes or model.final_layer().out_channels
        weight = class_weights(dataset, num_classes, config.class_weight_power).to(device)
        log.info("class weights: %s", ", ".join(f"{w:.2f}" for w in weight.tolist()))
    data = _Augmented(dataset, TrainAugment(config.scale, config.flip, config.crop), config.photometric)
    batches = _forever(make_loader(data, config.batch_size, shuffle=True, seed=config.seed))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _poly(s, config))
    losses, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not config.progress, dynamic_ncols=True)
    for step in bar:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        with precision.autocast():
            loss = segmentation_loss(model(images), labels, weight, config.hard_pixel_fraction, config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(opt)
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


# The plan fields every key has always spelled out; every later field is a recipe option.
_KEY_FIELDS = ("data", "arch", "steps", "batch_size", "seed")


@dataclass(frozen=True)
class PretrainPlan:
    """A source model to make when no checkpoint is at hand: what an experiment or preset names.

    The fields after ``seed`` are the recipe options of :class:`PretrainConfig` in a form a TOML
    file can carry (``photometric = true`` means the default :class:`PhotometricAugment`); at
    their defaults the plan trains exactly as before they existed.
    """

    data: DataSpec
    arch: str = "small_unet"
    steps: int = 300
    batch_size: int = 8
    seed: int = 0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scale: tuple[float, float] = (0.75, 1.5)
    crop: tuple[int, int] | None = None
    flip: bool = True
    photometric: bool = False
    class_weight_power: float = 0.0
    hard_pixel_fraction: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        # A TOML file gives lists; tuples keep the key and the comparison with the defaults stable.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        self.config()  # validates the options where they are written, not when training starts

    @classmethod
    def from_table(cls, raw: object, parse_data: Callable[[str], DataSpec], where: str) -> PretrainPlan:
        """A plan from a TOML table (``[pretrain]``, ``[source.pretrain]``): ``data`` through ``parse_data``,
        which fills the caller's placeholders, and every other key checked against the fields."""
        if not isinstance(raw, Mapping) or "data" not in raw:
            raise ValueError(f"{where} needs a 'data' spec")
        return build_options(cls, {**raw, "data": parse_data(str(raw["data"]))}, where)

    def options(self) -> dict[str, str]:
        """The recipe options that differ from their defaults, by name, as text."""
        changed = {}
        for field in fields(self):
            if field.name in _KEY_FIELDS:
                continue
            value = getattr(self, field.name)
            if value != field.default:
                changed[field.name] = repr(PhotometricAugment()) if field.name == "photometric" else str(value)
        return changed

    def key(self) -> str:
        """Everything that decides the weights, for naming a cached checkpoint.

        Options at their defaults are left out, so a plan written before they existed keeps its key
        (and its cached model); the photometric option is spelled out in full, so a change of
        :class:`PhotometricAugment`'s defaults makes a new key.
        """
        base = "|".join(str(getattr(self, name)) for name in _KEY_FIELDS)
        return base + "".join(f"|{name}={value}" for name, value in self.options().items())

    def config(self, progress: bool = True, device: str = "cpu", amp: str = "off") -> PretrainConfig:
        return PretrainConfig(
            arch=self.arch,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=self.seed,
            lr=self.lr,
            weight_decay=self.weight_decay,
            scale=self.scale,
            crop=self.crop,
            flip=self.flip,
            photometric=PhotometricAugment() if self.photometric else None,
            class_weight_power=self.class_weight_power,
            hard_pixel_fraction=self.hard_pixel_fraction,
            label_smoothing=self.label_smoothing,
            device=device,
            amp=amp,
            progress=progress,
        )


def pretrain_to_file(
    plan: PretrainPlan, path: str | Path, progress: bool = True, device: str = "cpu", amp: str = "off"
) -> Path:
    """Pretrain by ``plan`` and write a ``checkpoint/1`` file that records the plan (not where it trained)."""
    model = pretrain(plan.data, plan.config(progress, device, amp))
    meta = {"data": str(plan.data), "steps": str(plan.steps), "seed": str(plan.seed)}
    meta |= {"batch_size": str(plan.batch_size), "pretrain_key": plan.key(), **plan.options()}
    return save_checkpoint(model, path, plan.arch, dataset_classes(plan.data.kind, plan.data.root), meta)
