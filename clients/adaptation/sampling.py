"""Which images a training step sees: uniform target draws and rare-class source draws.

Draws come from a generator seeded by (seed, step), never from a stateful iterator, so
a run resumed at step t sees exactly the batches an uninterrupted run would have seen.
The generator is a CPU one whatever device trains, and batches are built on the CPU
where the data lies, then moved: a GPU run sees the batches a CPU run sees.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.data import IGNORE

__all__ = ["RareClassSampler", "labeled_batch", "step_generator", "target_batch", "uniform_indices"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step: independent of how many steps ran before in this process."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)


def uniform_indices(n: int, batch: int, generator: torch.Generator) -> list[int]:
    """``batch`` distinct indices when n allows, else with repeats."""
    if n >= batch:
        return torch.randperm(n, generator=generator, device=generator.device)[:batch].tolist()
    return torch.randint(n, (batch,), generator=generator, device=generator.device).tolist()


def target_batch(dataset: Dataset, indices: list[int], device: torch.device | str = "cpu") -> Tensor:
    """Images only, on ``device``: a target item's label is dropped on read, so adaptation cannot touch it."""
    return torch.stack([dataset[i][0] for i in indices]).to(device)


def labeled_batch(dataset: Dataset, indices: list[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([im for im, _ in items]).to(device), torch.stack([lb for _, lb in items]).to(device)


class RareClassSampler:
    """Rare Class Sampling (DAFormer): draw a class, then a source image that shows it.

    P(c) = softmax((1 - f_c) / T) with f_c the pixel share of class c in the source labels;
    only images with at least ``min_pixels`` pixels of c (3000 at 512x512, scaled by image
    area) are candidates. Rare classes then appear in most batches, which keeps the
    self-training from forgetting them once confident pseudo-labels stop covering them.
    """

    def __init__(self, source: Dataset, num_classes: int, temperature: float = 0.01, min_pixels: int = 3000) -> None:
        counts = torch.zeros(len(source), num_classes, dtype=torch.int64, device="cpu")  # with the labels
        area = 0
        for i in range(len(source)):
            label = source[i][1]
            area = label.numel()
            valid = label[label != IGNORE]
            counts[i] = torch.bincount(valid.flatten(), minlength=num_classes)[:num_classes]
        threshold = max(1, round(min_pixels * area / (512 * 512)))
        self.candidates = [torch.nonzero(counts[:, c] >= threshold).flatten() for c in range(num_classes)]
        freq = counts.sum(0).double() / counts.sum().clamp_min(1)
        logits = (1.0 - freq) / temperature
        usable = torch.tensor([len(c) > 0 for c in self.candidates], device=logits.device)
        if not usable.any():
            raise ValueError("rare class sampling: no source image has enough pixels of any class")
        self.class_probs = torch.where(usable, logits, torch.full_like(logits, -torch.inf)).softmax(0)
        self.frequencies = freq

    def sample(self, batch: int, generator: torch.Generator) -> list[int]:
        classes = torch.multinomial(self.class_probs, batch, replacement=True, generator=generator)
        out = []
        for c in classes.tolist():
            cand = self.candidates[c]
            out.append(int(cand[torch.randint(len(cand), (1,), generator=generator, device=generator.device)]))
        return out
