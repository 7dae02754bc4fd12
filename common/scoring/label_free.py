"""Label-free scores of a candidate model on a site's own unlabeled images: only scalars come out.

A deployed run has no labels anywhere, so choosing among candidate merges needs scores a
site can compute alone. Each score here is a function registered in
``common.scoring.scores.SCORES``, oriented so that higher is better, and all of them read
the same few forward passes of the candidate over the site's images (plus one of the
site's own adapted model):

- ``agreement``: the share of pixels where the candidate's class equals the site model's;
- ``neg-entropy``: minus the mean normalised prediction entropy (plain entropy is known
  to mislead under shift; it is here to be measured against the others);
- ``confident``: the share of pixels above the pseudo-label confidence threshold;
- ``diversity``: the entropy of the mean prediction (a model that collapses to a few
  classes scores low);
- ``mix``: ClassMix consistency in the spirit of MixVal: half the classes of one image,
  by the candidate's own labels, are pasted onto another, and the score is the share of
  pixels of the mixed image the candidate labels as the paste implies;
- ``photometric``: agreement of the candidate with itself under a brightness and
  contrast change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from common.device.runtime import model_device
from common.models.segmenter import Segmenter
from common.scoring.predictions import confident_fraction, normalized_entropy
from common.scoring.scores import SCORES

__all__ = [
    "SCORE_IMAGES",
    "Passes",
    "agreement",
    "confident",
    "diversity",
    "forward_passes",
    "label_free_scores",
    "mix",
    "neg_entropy",
    "photometric_agreement",
    "score_images",
]


@dataclass(frozen=True)
class Passes:
    """The forward passes of one batch that every score reads: computed once per candidate."""

    probs: Tensor  # [B, C, H, W] the candidate's softmax
    labels: Tensor  # [B, H, W] its classes
    own: Tensor | None  # the site's adapted model's classes, when it has one
    mixed: Tensor | None  # the candidate's classes on the ClassMix images (None for a single image)
    expected: Tensor | None  # what the paste implies there
    photometric: Tensor  # the candidate's classes under the brightness and contrast change


def _share(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    agree = total = 0
    for a, b in pairs:
        agree += int((a == b).sum())
        total += a.numel()
    return agree / total if total else float("nan")


def agreement(passes: list[Passes]) -> float:
    return _share((p.labels, p.own) for p in passes if p.own is not None)


def neg_entropy(passes: list[Passes]) -> float:
    return -float(torch.cat([normalized_entropy(p.probs).reshape(-1) for p in passes]).mean())


def confident(passes: list[Passes]) -> float:
    return float(torch.cat([confident_fraction(p.probs) for p in passes]).mean())


def diversity(passes: list[Passes]) -> float:
    marginal = sum(p.probs.sum((0, 2, 3)) for p in passes)
    marginal = marginal / marginal.sum()
    return float(-(marginal * marginal.clamp_min(1e-12).log()).sum() / math.log(marginal.numel()))


def mix(passes: list[Passes]) -> float:
    return _share((p.mixed, p.expected) for p in passes if p.mixed is not None and p.expected is not None)


def photometric_agreement(passes: list[Passes]) -> float:
    return _share((p.photometric, p.labels) for p in passes)


def _mix_pairs(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image gets half the classes (by ``labels``) of the next image pasted onto it."""
    paste_images, paste_labels = images.roll(1, 0), labels.roll(1, 0)
    masks = []
    for lbl in paste_labels:
        classes = lbl.unique()
        order = torch.randperm(classes.numel(), generator=generator, device=generator.device).to(classes.device)
        chosen = classes[order[: (classes.numel() + 1) // 2]]
        masks.append(torch.isin(lbl, chosen))
    mask = torch.stack(masks)
    mixed = torch.where(mask.unsqueeze(1), paste_images, images)
    expected = torch.where(mask, paste_labels, labels)
    return mixed, expected


def _photometric(images: Tensor) -> Tensor:
    from torchvision.transforms.v2 import functional as TF  # here: the import costs a ClientApp worker ~3 s

    return TF.adjust_contrast(TF.adjust_brightness(images, 0.7), 1.2).clamp(0.0, 1.0)


@torch.no_grad()
def forward_passes(candidate: Segmenter, own: Segmenter | None, images: Tensor, generator: torch.Generator) -> Passes:
    probs = candidate(images).softmax(1)
    labels = probs.argmax(1)
    own_labels = own(images).argmax(1) if own is not None else None
    mixed = expected = None
    if images.shape[0] > 1:
        mixed_images, expected = _mix_pairs(images, labels, generator)
        mixed = candidate(mixed_images).argmax(1)
    return Passes(probs, labels, own_labels, mixed, expected, candidate(_photometric(images)).argmax(1))


SCORE_IMAGES = 16  # images a site scores each candidate on: enough to rank candidates, cheap


def score_images(dataset: Dataset, limit: int = SCORE_IMAGES) -> Dataset:
    """At most ``limit`` images, evenly spaced through the site's set (frames in time order stay spread)."""
    step = max(1, len(dataset) // limit)  # type: ignore[arg-type]
    return Subset(dataset, list(range(0, len(dataset), step))[:limit])  # type: ignore[arg-type]


@torch.no_grad()
def label_free_scores(
    candidate: Segmenter, own: Segmenter | None, batches: Iterable[Tensor], seed: int = 0
) -> dict[str, float]:
    """Every registered score of ``candidate`` on the image batches; ``own`` is the site's adapted model.

    The passes run on the candidate's device (``own`` must be there too); the ClassMix draws
    come from a CPU generator, so a GPU site pastes the classes a CPU site pastes.
    """
    candidate.eval()
    if own is not None:
        own.eval()
    device = model_device(candidate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    passes = [forward_passes(candidate, own, images.to(device), generator) for images in batches]
    if not passes:
        raise ValueError("no images to score on")
    scores = {name: SCORES.get(name).load()(passes) for name in SCORES}
    return {name: value for name, value in scores.items() if not math.isnan(value)}
