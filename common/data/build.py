"""``build_dataset``: from a DataSpec to a torch Dataset, with the same selection rules for every reader."""

from __future__ import annotations

from torch.utils.data import Dataset

from common.data.errors import DataError
from common.data.spec import DataSpec
from common.data.synthetic import DEFAULT_IMAGES_PER_DOMAIN, DEFAULT_SIZE, SYNTHETIC_STYLES, SyntheticDataset

__all__ = ["DataError", "build_dataset"]


def build_dataset(spec: DataSpec) -> Dataset:
    """The dataset ``spec`` selects; items are (float32 [3,H,W] in [0,1], int64 [H,W] train ids, 255 ignore)."""
    if spec.kind == "synthetic":
        return _build_synthetic(spec)
    from common.data.readers import build_file_dataset

    return build_file_dataset(spec)


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
