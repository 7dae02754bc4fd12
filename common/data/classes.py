"""Class lists and label-id tables: every reader maps its raw label values to train ids here.

The tables are written out rather than derived so that a reader's mapping can be checked
against the public definitions line by line (cityscapesscripts ``labels.py``, the IDD
``anue_labels.py`` level-3 column, the SegNet CamVid README).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_FAMILY",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "IDD_LEVEL3_TO_TRAIN_ID",
    "IGNORE",
    "SYNTHETIC_CLASSES",
    "dataset_classes",
    "lookup_table",
    "read_class_list",
]

IGNORE = 255

SYNTHETIC_CLASSES = ("sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "sign")

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
CAMVID_VOID = 11

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# Datasets whose labels are (or are mapped onto) the 19 Cityscapes train ids.
CITYSCAPES_FAMILY = ("cityscapes", "gta5", "idd", "acdc", "darkzurich")

# cityscapesscripts/helpers/labels.py: label id -> train id; ids 0..33 not listed here are
# void or "ignoreInEval" classes (parking, rail track, guard rail, bridge, tunnel, polegroup,
# caravan, trailer, ...), all of which become 255.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
CITYSCAPES_NUM_IDS = 34  # label ids 0..33 exist; anything else in a labelIds PNG is corrupt

# IDD level-3 ids (26 classes, anue_labels.py) -> Cityscapes train ids. Where a level-3 class
# merges Cityscapes classes with things Cityscapes ignores, the dominant member decides:
# "non-drivable fallback" (with rail track) is mostly terrain; "person" includes the rare
# "animal". Classes with no Cityscapes counterpart stay 255. Cityscapes "train" has none.
IDD_LEVEL3_TO_TRAIN_ID: dict[int, int] = {
    0: 0,  # road
    1: IGNORE,  # drivable fallback (parking, drivable fallback)
    2: 1,  # sidewalk
    3: 9,  # non-drivable fallback (+ rail track) -> terrain
    4: 11,  # person (+ animal)
    5: 12,  # rider
    6: 17,  # motorcycle
    7: 18,  # bicycle
    8: IGNORE,  # autorickshaw: no Cityscapes class
    9: 13,  # car
    10: 14,  # truck
    11: 15,  # bus
    12: IGNORE,  # vehicle fallback (caravan, trailer, train, other): mixed
    13: IGNORE,  # curb
    14: 3,  # wall
    15: 4,  # fence
    16: IGNORE,  # guard rail (ignored in Cityscapes)
    17: IGNORE,  # billboard
    18: 7,  # traffic sign
    19: 6,  # traffic light
    20: 5,  # pole (+ polegroup)
    21: IGNORE,  # obs-str-bar-fallback
    22: 2,  # building
    23: IGNORE,  # bridge, tunnel (ignored in Cityscapes)
    24: 8,  # vegetation
    25: 10,  # sky (+ fallback background)
}
IDD_NUM_LEVEL3_IDS = 26


def lookup_table(mapping: dict[int, int], num_valid: int) -> np.ndarray:
    """A 256-entry uint8->int16 table: mapped ids, 255 for known-but-ignored, -1 for invalid.

    -1 marks values that cannot occur in a well-formed label file, so a reader can tell a
    corrupt label from an ignored class with one vectorised lookup.
    """
    table = np.full(256, -1, dtype=np.int16)
    table[:num_valid] = IGNORE
    for src, dst in mapping.items():
        table[src] = dst
    table[IGNORE] = IGNORE
    return table


def identity_table(num_classes: int, void: int | None = None) -> np.ndarray:
    """Table for labels that already hold class indices; ``void`` (if any) becomes 255."""
    table = np.full(256, -1, dtype=np.int16)
    table[:num_classes] = np.arange(num_classes)
    if void is not None:
        table[void] = IGNORE
    table[IGNORE] = IGNORE
    return table


def read_class_list(root: str | Path) -> list[str]:
    """Class names of a generic folder dataset, one per line of ``classes.txt``."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no classes.txt (a folder dataset lists its class names there, one a line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: the class list is empty")
    if len(names) > IGNORE:
        raise ValueError(f"{path}: {len(names)} classes; label PNGs hold at most {IGNORE} (255 is ignore)")
    return names


def dataset_classes(kind: str, root: str | Path = "") -> list[str]:
    """Class names of a dataset kind; ``len()`` is the model's number of outputs.

    A folder dataset names its own classes, so ``root`` is needed for ``kind="folder"``.
    """
    if kind == "synthetic":
        return list(SYNTHETIC_CLASSES)
    if kind == "camvid":
        return list(CAMVID_CLASSES)
    if kind in CITYSCAPES_FAMILY:
        return list(CITYSCAPES_CLASSES)
    if kind == "folder":
        if not str(root):
            raise ValueError("dataset_classes('folder') needs the dataset root (its classes.txt names the classes)")
        return read_class_list(root)
    raise ValueError(f"unknown dataset kind {kind!r}")
