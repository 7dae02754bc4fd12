"""The CamVid reader on the real SegNet-layout copy beside the repo (skipped where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.data import DataSpec, build_dataset, dataset_classes

CAMVID = Path(os.environ.get("FEDMERGE_CAMVID") or Path(__file__).parents[2] / "shared/data/camvid")
pytestmark = pytest.mark.skipif(not (CAMVID / "trainannot").is_dir(), reason=f"CamVid not found at {CAMVID}")


def spec(**fields: object) -> DataSpec:
    return DataSpec(kind="camvid", root=str(CAMVID), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("split", "domain", "frames"),
    [
        ("all", "0016E5", 305),
        ("val", "0016E5", 101),
        ("test", "Seq05VD", 110),
        ("train", "0001TP", 62),
        ("train", "0006R0", 70),
    ],
)
def test_sequences_have_the_documented_frame_counts(split: str, domain: str, frames: int) -> None:
    assert len(build_dataset(spec(split=split, domain=domain))) == frames


def test_items_are_180x240_with_camvid_ids_and_void_as_ignore() -> None:
    ds = build_dataset(spec(split="train", domain="0001TP"))
    values: set[int] = set()
    for i in (0, 30, 61):
        image, label = ds[i]
        assert image.shape == (3, 180, 240) and image.dtype == torch.float32
        assert label.shape == (180, 240) and label.dtype == torch.int64
        values |= set(label.unique().tolist())
    assert values <= set(range(len(dataset_classes("camvid")))) | {255}
    assert 255 in values and 3 in values  # void and road both occur


def test_all_splits_interleave_0016E5_in_frame_order_and_time_splits_cut_in_time() -> None:
    ds = build_dataset(spec(split="all", domain="0016E5"))
    names = [s.image.name for s in ds.samples]
    assert names == sorted(names)
    parents = [s.image.parent.name for s in ds.samples]
    assert parents.index("val") < len(parents) - 1 - parents[::-1].index("train")  # val sits between train frames
    first = build_dataset(DataSpec.parse(f"camvid:{CAMVID}?split=train&domain=0001TP&time=first:42"))
    last = build_dataset(DataSpec.parse(f"camvid:{CAMVID}?split=train&domain=0001TP&time=last:20"))
    assert [s.image.name for s in first.samples + last.samples] == [
        s.image.name for s in build_dataset(spec(split="train", domain="0001TP")).samples
    ]


def test_resize_to_half_resolution_keeps_label_ids() -> None:
    image, label = build_dataset(spec(split="test", domain="Seq05VD", size=(90, 120), num_images=1))[0]
    assert image.shape == (3, 90, 120) and label.shape == (90, 120)
    assert set(label.unique().tolist()) <= set(range(11)) | {255}
