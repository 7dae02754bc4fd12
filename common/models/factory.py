"""Build any model fedmerge knows by name: a base architecture or HRDA's ``hrda_<base>`` wrapper.

Every name comes from the one registry (``common.models.catalog``); the wrapper is built
from a base model, so the one function that knows both sits above the modules that
define them.
"""

from __future__ import annotations

from common.models.base import build_base_model
from common.models.catalog import HRDA_PREFIX
from common.models.multires import build_multires
from common.models.segmenter import Segmenter
from common.models.weights import WeightsFile

__all__ = ["build_model"]


def build_model(
    arch: str, num_classes: int, weights: WeightsFile = None, backbone_weights: WeightsFile = None
) -> Segmenter:
    """``arch`` with ``weights`` (a whole-model file) or ``backbone_weights`` (an ImageNet-style one)."""
    if arch.startswith(HRDA_PREFIX):
        return build_multires(arch.removeprefix(HRDA_PREFIX), num_classes, weights, backbone_weights)
    return build_base_model(arch, num_classes, weights, backbone_weights)
