"""Readers for datasets on disk: list (image, label) files per sequence, decode labels to train ids.

Each reader only knows its directory layout and label encoding. Selection (domain, time
split, cap) and decoding are shared, so every dataset behaves the same way: files sorted by
name within a sequence (names carry the frame number, so this is time order), labels checked
when an item is read, and every fault reported as a ``DataError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from common.data.classes import (
    CAMVID_CLASSES,
    CAMVID_VOID,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_NUM_IDS,
    IDD_LEVEL3_TO_TRAIN_ID,
    IDD_NUM_LEVEL3_IDS,
    identity_table,
    lookup_table,
    read_class_list,
)
from common.data.errors import DataError
from common.data.spec import DataSpec
from common.data.transforms import joint_resize

__all__ = ["FileDataset", "LabelCodec", "Sample", "build_file_dataset", "list_samples"]

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
CAMVID_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path
    sequence: str  # the unit of time order: a video sequence, a city, a synthetic style


@dataclass(frozen=True)
class LabelCodec:
    """Raw label value -> train id through a 256-entry table (-1 marks impossible values)."""

    table: np.ndarray
    description: str  # what valid raw values are, for error messages

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim != 2:
            raise DataError(f"{path}: a label must be a one-channel image, this one has shape {raw.shape}")
        if raw.dtype != np.uint8:
            if raw.size and (int(raw.max()) > 255 or int(raw.min()) < 0):
                bad = int(raw.max()) if int(raw.max()) > 255 else int(raw.min())
                raise DataError(f"{path}: label value {bad} is outside {self.description}")
            raw = raw.astype(np.uint8)
        mapped = self.table[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0])
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise DataError(f"{path}: label value(s) {shown} outside {self.description}")
        return mapped.astype(np.int64)


CITYSCAPES_CODEC = LabelCodec(
    lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NUM_IDS), "the Cityscapes label ids 0..33 (and 255)"
)
IDD_CODEC = LabelCodec(lookup_table(IDD_LEVEL3_TO_TRAIN_ID, IDD_NUM_LEVEL3_IDS), "the IDD level-3 ids 0..25 (and 255)")
TRAIN_ID_CODEC = LabelCodec(identity_table(len(CITYSCAPES_CLASSES)), "the Cityscapes train ids 0..18 (and 255)")
CAMVID_CODEC = LabelCodec(identity_table(len(CAMVID_CLASSES), void=CAMVID_VOID), "the CamVid ids 0..11 (and 255)")


# ----------------------------------------------------------------------------- file listing


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        have = (
            f"; {parent} holds: {', '.join(found[:12]) or 'nothing'}" if parent.is_dir() else f"; {parent} is missing"
        )
        raise DataError(f"{path}: no {what} directory{have}")
    return path


def _pair(image: Path, label: Path, sequence: str) -> Sample:
    if not label.is_file():
        raise DataError(f"{image}: no label file; expected {label}")
    return Sample(image, label, sequence)


def _with_suffix_swap(image: Path, image_tail: str, label_dir: Path, label_tail: str) -> Path:
    return label_dir / (image.name[: -len(image_tail)] + label_tail)


def _nested(image_root: Path, label_root: Path, image_tail: str, label_tail: str, prefix: str = "") -> list[Sample]:
    """``<root>/<sequence>/<stem><tail>`` layouts (Cityscapes, IDD, ACDC, Dark Zurich)."""
    samples = []
    for seq_dir in sorted(p for p in _require_dir(image_root, "image").iterdir() if p.is_dir()):
        for image in sorted(seq_dir.glob(f"*{image_tail}")):
            label = _with_suffix_swap(image, image_tail, label_root / seq_dir.name, label_tail)
            samples.append(_pair(image, label, prefix + seq_dir.name))
    return samples


def _list_cityscapes(root: Path, split: str) -> list[Sample]:
    return _nested(root / "leftImg8bit" / split, root / "gtFine" / split, "_leftImg8bit.png", "_gtFine_labelIds.png")


def _list_idd(root: Path, split: str) -> list[Sample]:
    return _nested(
        root / "leftImg8bit" / split, root / "gtFine" / split, "_leftImg8bit.png", "_gtFine_labellevel3Ids.png"
    )


def _list_acdc(root: Path, split: str) -> list[Sample]:
    samples = []
    for condition in ACDC_CONDITIONS:
        if (root / "rgb_anon" / condition).is_dir():
            samples += _nested(
                root / "rgb_anon" / condition / split,
                root / "gt" / condition / split,
                "_rgb_anon.png",
                "_gt_labelTrainIds.png",
                prefix=f"{condition}/",
            )
    if not samples:
        _require_dir(root / "rgb_anon", "rgb_anon")
    return samples


def _list_darkzurich(root: Path, split: str) -> list[Sample]:
    return _nested(
        root / "rgb_anon" / split / "night",
        root / "gt" / split / "night",
        "_rgb_anon.png",
        "_gt_labelTrainIds.png",
    )


def _list_gta5(root: Path, split: str) -> list[Sample]:
    if split not in ("train", "all"):
        raise DataError(f"{root}: GTA5 has no {split!r} split here (images/ and labels/ only); use split=all")
    images, labels = _require_dir(root / "images", "images"), root / "labels"
    return [_pair(p, labels / p.name, "gta5") for p in sorted(images.glob("*.png"))]


def _camvid_sequence(path: Path) -> str:
    """``0016E5_07959.png`` -> ``0016E5``; ``Seq05VD_f00000.png`` -> ``Seq05VD``."""
    return path.stem.split("_", 1)[0]


def _list_camvid(root: Path, split: str) -> list[Sample]:
    splits = CAMVID_SPLITS if split == "all" else (split,)
    samples = []
    for name in splits:
        images, labels = _require_dir(root / name, f"CamVid {name}"), root / f"{name}annot"
        samples += [_pair(p, labels / p.name, _camvid_sequence(p)) for p in sorted(images.glob("*.png"))]
    # A sequence can span splits (0016E5: train and val interleave in time): sort by frame name.
    return sorted(samples, key=lambda s: (s.sequence, s.image.name))


def _list_folder(root: Path, split: str) -> list[Sample]:
    """``images/`` + ``labels/`` at the root, or one such pair per domain sub-folder."""
    if split not in ("train", "all"):
        raise DataError(f"{root}: a folder dataset has no splits; got split={split!r} (use train or all)")
    if (root / "images").is_dir():
        domains = [(root.name, root)]
    else:
        domains = [(p.name, p) for p in sorted(_require_dir(root, "dataset").iterdir()) if (p / "images").is_dir()]
    samples = []
    for name, base in domains:
        for image in sorted(p for p in (base / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            samples.append(_pair(image, base / "labels" / (image.stem + ".png"), name))
    return samples


_LISTERS: dict[str, Callable[[Path, str], list[Sample]]] = {
    "cityscapes": _list_cityscapes,
    "gta5": _list_gta5,
    "idd": _list_idd,
    "acdc": _list_acdc,
    "darkzurich": _list_darkzurich,
    "camvid": _list_camvid,
    "folder": _list_folder,
}


def _codec(spec: DataSpec) -> LabelCodec:
    if spec.kind in ("cityscapes", "gta5"):
        return CITYSCAPES_CODEC
    if spec.kind == "idd":
        return IDD_CODEC
    if spec.kind in ("acdc", "darkzurich"):
        return TRAIN_ID_CODEC
    if spec.kind == "camvid":
        return CAMVID_CODEC
    n = len(read_class_list(spec.root))
    return LabelCodec(identity_table(n), f"the class indices 0..{n - 1} of classes.txt (and 255)")


def _domain_of(sequence: str) -> str:
    """ACDC sequences are ``condition/seq``: the condition is the domain."""
    return sequence.split("/", 1)[0]


def _matches(sample: Sample, wanted: set[str]) -> bool:
    return sample.sequence in wanted or _domain_of(sample.sequence) in wanted


def list_samples(spec: DataSpec) -> list[Sample]:
    """The files ``spec`` selects, in time order: split, domain filter, time split, cap."""
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root for {spec.kind!r} does not exist")
    samples = _LISTERS[spec.kind](root, spec.split)
    if spec.domain is not None:
        wanted = {d.strip() for d in spec.domain.split(",")}
        kept = [s for s in samples if _matches(s, wanted)]
        if not kept:
            found = sorted({_domain_of(s.sequence) for s in samples} | {s.sequence for s in samples})
            shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
            raise DataError(
                f"no images for domain {spec.domain!r} in {spec.kind} root {root} (split {spec.split!r}); "
                f"domains there: {shown or 'none'}"
            )
        samples = kept
    if not samples:
        raise DataError(f"no images in {spec.kind} root {root} (split {spec.split!r})")
    if spec.time_split is not None:
        samples = _apply_time_split(spec, samples)
    return samples[: spec.num_images] if spec.num_images is not None else samples


def _apply_time_split(spec: DataSpec, samples: list[Sample]) -> list[Sample]:
    """Split every sequence on its own: a time split of a mix of sequences must not cut whole ones."""
    assert spec.time_split is not None
    kept: list[Sample] = []
    for name, group in groupby(samples, key=lambda s: s.sequence):
        sequence = list(group)
        try:
            kept += [sequence[i] for i in spec.time_split.select(len(sequence))]
        except ValueError as exc:
            raise DataError(f"sequence {name!r} in {spec.root}: {exc}") from None
    return kept


# ----------------------------------------------------------------------------- decoding


def read_image(path: Path) -> Tensor:
    """RGB float32 [3,H,W] in [0,1]; a corrupt or truncated file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_label(path: Path, codec: LabelCodec) -> Tensor:
    try:
        with Image.open(path) as img:
            raw = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the label ({exc})") from None
    return torch.from_numpy(codec.decode(raw, path))


class FileDataset(Dataset):
    """(image, label) pairs read from disk on access; nothing is checked until it is read."""

    def __init__(
        self, samples: list[Sample], codec: LabelCodec, size: tuple[int, int] | None = None, root: Path | None = None
    ) -> None:
        self.samples, self.codec, self.size, self.root = samples, codec, size, root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        sample = self.samples[idx]
        image, label = read_image(sample.image), read_label(sample.label, self.codec)
        if image.shape[-2:] != label.shape:
            raise DataError(
                f"{sample.label}: label is {tuple(label.shape)} (HxW) but its image {sample.image.name} "
                f"is {tuple(image.shape[-2:])}"
            )
        if self.size is not None:
            image, label = joint_resize(image, label, self.size)
        return image, label

    def domain_of(self, idx: int) -> str:
        return _domain_of(self.samples[idx].sequence)

    def image_key(self, idx: int) -> str:
        """The image's path inside the dataset root: the same file has the same key on every machine."""
        image = self.samples[idx].image
        return image.relative_to(self.root).as_posix() if self.root is not None else image.as_posix()


def _check_one_size(spec: DataSpec, samples: list[Sample]) -> None:
    """Images of one set must share a size unless the spec resizes them: batches stack them.

    Only the headers are read; a clash names a file of each size, not a stack error later.
    """
    first: dict[tuple[int, int], Path] = {}
    for sample in samples:
        try:
            with Image.open(sample.image) as image:
                first.setdefault(image.size, sample.image)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{sample.image}: cannot read the image ({exc})") from None
        if len(first) > 1:
            (a, pa), (b, pb) = list(first.items())[:2]
            raise DataError(
                f"{spec}: images of different sizes in one set: {pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]} "
                "(W x H); add size=HxW to the data spec to resize them, or keep one size per folder"
            )


def build_file_dataset(spec: DataSpec) -> FileDataset:
    samples = list_samples(spec)
    if spec.size is None:
        _check_one_size(spec, samples)
    return FileDataset(samples, _codec(spec), spec.size, Path(spec.root))
