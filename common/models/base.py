"""One registered base architecture, built offline, optionally filled from local weights files.

``common.models.factory.build_model`` adds the ``hrda_`` wrapper on top; the wrapper
itself builds its base through here.
"""

from __future__ import annotations

from pathlib import Path

from common.models.catalog import ARCHITECTURES
from common.models.segmenter import Segmenter
from common.models.weights import WeightsFile, load_into, load_weights_file, strip_prefixes

__all__ = ["build_base_model"]


def build_base_model(
    arch: str, num_classes: int, weights: WeightsFile = None, backbone_weights: WeightsFile = None
) -> Segmenter:
    """One of :data:`ARCHITECTURES`, never downloading (torchvision is asked for ``weights=None``)."""
    entry = ARCHITECTURES.get(arch)
    model = entry.load()(num_classes, entry.make_options())
    if backbone_weights is not None:
        # "base.backbone.": an hrda_ checkpoint's backbone (e.g. an imported ImageNet start of hrda_daformer_b5)
        state = strip_prefixes(load_weights_file(backbone_weights), ("base.backbone.", "backbone.", "module."))
        load_into(model.backbone, state, "backbone", Path(backbone_weights), strict=False)
    if weights is not None:
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.endswith(".num_samples") and not k.startswith("aux_")}
        load_into(model, strip_prefixes(state, ("module.", "net.")), "model", Path(weights), strict=True)
    return model
