"""HRDA (Hoyer et al., 2022) on DAFormer's self-training, with the labeled source at the site.

Each step: supervised source loss (plus the optional ImageNet feature distance) ->
teacher pseudo-labels on a target batch -> ClassMix of source classes into the target
images -> strong augmentation -> weighted loss on the mixed batch -> one optimiser step
-> EMA teacher update. On an ``hrda_<base>`` model every loss is taken on the fused
multi-resolution prediction of a context view and a random detail crop, plus 0.1 x the
detail crop alone, and the teacher labels with sliding-window inference; on a plain model
the same loop runs at a single resolution (DAFormer).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from clients.adaptation.configs import HRDAConfig
from clients.adaptation.context import AdaptContext
from clients.adaptation.losses import pseudo_labels, weighted_cross_entropy
from clients.adaptation.mixing import StrongAugment, class_mix
from clients.adaptation.norm import refresh_statistics, set_bn_mode
from clients.adaptation.sampling import RareClassSampler, labeled_batch, target_batch, uniform_indices
from clients.adaptation.teacher_student import run_teacher_student, start_teacher_student
from common.data import IGNORE
from common.device.runtime import model_device
from common.models.multires import MultiResSegmenter, random_box
from common.models.segmenter import Segmenter
from common.models.weights import load_weights_file

__all__ = ["HRDAConfig", "adapt", "feature_distance", "imagenet_model", "random_crop"]

log = logging.getLogger(__name__)


def imagenet_model(model: Segmenter, weights: str) -> Segmenter:
    """A frozen copy of ``model`` whose backbone holds the ImageNet weights in ``weights``."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    backbone = (frozen.base if isinstance(frozen, MultiResSegmenter) else frozen).backbone
    state = {}
    for key, value in load_weights_file(weights).items():
        for prefix in ("module.", "base.", "backbone."):  # base.: the backbone of an hrda_ checkpoint
            key = key.removeprefix(prefix)
        state[key] = value
    target = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in target}
    if not matched:
        raise ValueError(f"{weights}: no tensor matches the backbone; is this the right architecture?")
    backbone.load_state_dict({**target, **matched})  # completed, so strict (smp's MiT has no `strict` argument)
    return frozen


def feature_distance(student: Tensor, reference: Tensor, labels: Tensor, class_ids: list[int]) -> Tensor:
    """Mean L2 distance between feature vectors on the selected labeled pixels (DAFormer's FD).

    Keeping the features of source objects near their ImageNet features counters the
    source overfitting that erases what the pretrained backbone knew about those classes.
    The distance is taken in float32 even when the features come out of autocast.
    """
    lbl = F.interpolate(labels[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0].long()
    mask = torch.isin(lbl, torch.tensor(class_ids, device=lbl.device)) if class_ids else lbl != IGNORE
    dist = torch.linalg.vector_norm(student.float() - reference.float(), dim=1)
    return (dist * mask).sum() / mask.sum().clamp_min(1)


def _flip(gen: torch.Generator, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Flip each image of the batch left-right with probability 1/2 (same flip for image and label)."""
    which = (torch.rand(tensors[0].shape[0], generator=gen, device=gen.device) < 0.5).to(tensors[0].device)
    return tuple(torch.where(which.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t) for t in tensors)


def random_crop(gen: torch.Generator, size: tuple[int, int], *tensors: Tensor) -> tuple[Tensor, ...]:
    """One random ``size`` window per image of the batch, the same window in each tensor (an image and its label).

    A side shorter than the window is kept whole. Windows are drawn from the step's generator,
    image by image, so a resumed run cuts the same windows.
    """
    height, width = tensors[0].shape[-2:]
    ch, cw = min(size[0], height), min(size[1], width)
    cut: list[list[Tensor]] = [[] for _ in tensors]
    for i in range(tensors[0].shape[0]):
        top = int(torch.randint(height - ch + 1, (1,), generator=gen, device=gen.device))
        left = int(torch.randint(width - cw + 1, (1,), generator=gen, device=gen.device))
        for pieces, t in zip(cut, tensors, strict=True):
            pieces.append(t[i, ..., top : top + ch, left : left + cw])
    return tuple(torch.stack(pieces) for pieces in cut)


def _resize(images: Tensor, labels: Tensor, size: torch.Size) -> tuple[Tensor, Tensor]:
    images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return images.clamp(0.0, 1.0), labels


def adapt(model: Segmenter, target: Dataset, context: AdaptContext, config: HRDAConfig) -> None:
    source = context.source
    if source is None:
        raise ValueError("hrda needs the labeled source set at the site (AdaptContext.source)")
    multires = isinstance(model, MultiResSegmenter)
    if not multires:
        log.warning("hrda on a plain model runs single-resolution (DAFormer); wrap it as hrda_<arch> for HRDA")
    num_classes = model.final_layer().out_channels
    state, teacher = start_teacher_student(model, target, config, context)
    optimizer, precision = state.optimizer, state.precision
    device = model_device(model)
    sampler = (
        RareClassSampler(source, num_classes, config.rcs_temperature, config.rcs_min_pixels) if config.rcs else None
    )
    augment = StrongAugment() if config.augment else None
    reference = imagenet_model(model, context.backbone_weights) if context.backbone_weights else None
    fd_classes = config.fd_class_ids()
    crop = config.crop_size()

    def supervised(images: Tensor, labels: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        if not multires:
            return weighted_cross_entropy(model(images), labels, weights)
        box = random_box(*images.shape[-2:], model.config, gen)
        fused, detail = model.train_forward(images, box)
        rows, cols = box.slices()
        detail_loss = weighted_cross_entropy(detail, labels[:, rows, cols], weights[:, rows, cols])
        return weighted_cross_entropy(fused, labels, weights) + config.detail_weight * detail_loss

    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        refresh_statistics(t, config.bn_refresh, teacher.model, model, config.bn, target)
        src_idx = (
            sampler.sample(config.batch_size, gen) if sampler else uniform_indices(len(source), config.batch_size, gen)
        )
        src_images, src_labels = labeled_batch(source, src_idx, device)
        tgt_images = target_batch(target, uniform_indices(len(target), config.batch_size, gen), device)
        if crop is not None:
            src_images, src_labels = random_crop(gen, crop, src_images, src_labels)
            (tgt_images,) = random_crop(gen, crop, tgt_images)
        if src_images.shape[-2:] != tgt_images.shape[-2:]:  # ClassMix pastes pixel to pixel
            src_images, src_labels = _resize(src_images, src_labels, tgt_images.shape[-2:])
        if config.flip:
            src_images, src_labels = _flip(gen, src_images, src_labels)
            (tgt_images,) = _flip(gen, tgt_images)

        set_bn_mode(model, config.bn)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            src_loss = supervised(src_images, src_labels, torch.ones_like(src_labels, dtype=torch.float32), gen)
            fd = torch.zeros((), device=device)
            if reference is not None and config.fd_weight > 0:
                small = src_images
                if multires:
                    small = F.interpolate(src_images, scale_factor=model.config.context_scale, mode="bilinear")
                with torch.no_grad():
                    ref_feats = reference.features(small)
                fd = feature_distance(model.features(small), ref_feats, src_labels, fd_classes)
            source_loss = src_loss + config.fd_weight * fd
        precision.backward(source_loss)

        with precision.autocast():
            pl, pw = pseudo_labels(teacher.probs(tgt_images), config.threshold)
        mixed = class_mix(src_images, src_labels, tgt_images, pl, pw, gen)
        images = augment(mixed.images, gen) if augment is not None else mixed.images
        with precision.autocast():
            mix_loss = supervised(images, mixed.labels, mixed.weights, gen)
        precision.backward(mix_loss)
        precision.step(optimizer)
        teacher.update(model, t)
        return {
            "loss": src_loss.item() + mix_loss.item(),
            "source": src_loss.item(),
            "mix": mix_loss.item(),
            "feature-distance": fd.item(),
            "confident": float(pw.mean()),
        }

    run_teacher_student(state, step, context, config, "hrda", len(target))
    context.metrics["multires"] = float(multires)
    model.eval()
