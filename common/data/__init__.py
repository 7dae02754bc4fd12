"""The data layer: dataset selection (DataSpec), readers, synthetic domains and loaders.

Every dataset yields (image float32 [3,H,W] in [0,1], label int64 [H,W]) with train ids
and 255 for ignore, whatever its on-disk format.
"""

from common.data.build import DataError, build_dataset
from common.data.classes import IGNORE, dataset_classes
from common.data.loading import image_batches, make_loader
from common.data.spec import DATASET_KINDS, DataSpec, TimeSplit, parse_size
from common.data.synthetic import DEFAULT_SIZE, SYNTHETIC_STYLES, render

__all__ = [
    "DATASET_KINDS",
    "DEFAULT_SIZE",
    "IGNORE",
    "SYNTHETIC_STYLES",
    "DataError",
    "DataSpec",
    "TimeSplit",
    "build_dataset",
    "dataset_classes",
    "image_batches",
    "make_loader",
    "parse_size",
    "render",
]
