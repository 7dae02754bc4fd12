"""DataLoaders that give the same batches on every run and every machine.

Workers are off: the datasets are small, worker processes would multiply the memory of the
synthetic cache, and the order must not depend on scheduling.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageBatches", "image_batches", "make_loader"]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process loader; with ``shuffle`` the order depends on ``seed`` only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)


class ImageBatches:
    """Image-only batches of a labeled dataset, iterable any number of times.

    BN statistics and unlabeled adaptation must never see labels; handing them this view
    makes that a property of the type rather than of each caller's care.
    """

    def __init__(self, dataset: Dataset, batch_size: int) -> None:
        self.loader = make_loader(dataset, batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        for images, _labels in self.loader:
            yield images

    def __len__(self) -> int:
        return len(self.loader)


def image_batches(dataset: Dataset, batch_size: int) -> ImageBatches:
    return ImageBatches(dataset, batch_size)
