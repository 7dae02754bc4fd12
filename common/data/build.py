"""``build_dataset``: from a DataSpec to a torch Dataset, with the same selection rules for every reader."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.data.corruptions import Corruption, corrupt
from common.data.errors import DataError
from common.data.spec import DataSpec
from common.data.synthetic import DEFAULT_IMAGES_PER_DOMAIN, DEFAULT_SIZE, SYNTHETIC_STYLES, SyntheticDataset

__all__ = ["CorruptedDataset", "DataError", "build_dataset"]


def build_dataset(spec: DataSpec) -> Dataset:
    """The dataset ``spec`` selects; items are (float32 [3,H,W] in [0,1], int64 [H,W] train ids, 255 ignore)."""
    if spec.kind == "synthetic":
        dataset: KeyedDataset = _build_synthetic(spec)
    else:
        from common.data.readers import build_file_dataset

        dataset = build_file_dataset(spec)
    return dataset if spec.corruption is None else CorruptedDataset(dataset, spec.corruption)


class KeyedDataset(Protocol):
    """A dataset that can name each image stably: the key a corruption is seeded from."""

    def __len__(self) -> int: ...
    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]: ...
    def image_key(self, idx: int) -> str: ...
    def domain_of(self, idx: int) -> str: ...


class CorruptedDataset(Dataset):
    """Another dataset's items with the images corrupted and the labels passed through untouched.

    The corruption works on 8-bit pixels, as the images were stored; an image read from an 8-bit
    file converts there and back exactly, a resized one is rounded to the nearest level first.
    """

    def __init__(self, base: KeyedDataset, corruption: Corruption) -> None:
        self.base, self.corruption = base, corruption

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        image, label = self.base[idx]
        pixels = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        out = corrupt(np.ascontiguousarray(pixels), self.corruption, self.base.image_key(idx))
        return torch.from_numpy(out).permute(2, 0, 1).float().div_(255.0), label

    def domain_of(self, idx: int) -> str:
        return self.base.domain_of(idx)


def _build_synthetic(spec: DataSpec) -> SyntheticDataset:
    if spec.domain is None:
        styles = list(SYNTHETIC_STYLES)
    else:
        styles = [s.strip() for s in spec.domain.split(",")]
        unknown = [s for s in styles if s not in SYNTHETIC_STYLES]
        if unknown:
            raise ValueError(f"unknown synthetic style {unknown[0]!r}; choose from {', '.join(SYNTHETIC_STYLES)}")
    count = spec.num_images or DEFAULT_IMAGES_PER_DOMAIN
    indices = list(range(count))
    if spec.time_split is not None:
        indices = [indices[i] for i in spec.time_split.select(count)]
    return SyntheticDataset({s: indices for s in styles}, seed=spec.seed, size=spec.size or DEFAULT_SIZE)
