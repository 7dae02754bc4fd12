"""The data layer: dataset selection (DataSpec), readers, synthetic domains and loaders.

Every dataset yields (image float32 [3,H,W] in [0,1], label int64 [H,W]) with train ids
and 255 for ignore, whatever its on-disk format.

Names are imported on first use, so that reading a data spec (a configuration check,
``fedmerge --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DataError": "common.data.errors",
    "build_dataset": "common.data.build",
    "IGNORE": "common.data.classes",
    "dataset_classes": "common.data.classes",
    "image_batches": "common.data.loading",
    "make_loader": "common.data.loading",
    "DATASET_KINDS": "common.data.spec",
    "DataSpec": "common.data.spec",
    "TimeSplit": "common.data.spec",
    "parse_size": "common.data.spec",
    "DEFAULT_SIZE": "common.data.synthetic",
    "SYNTHETIC_STYLES": "common.data.synthetic",
    "render": "common.data.synthetic",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'common.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
