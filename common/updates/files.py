"""The site-update file: what a site's adapted model looks like on disk.

One safetensors file holds the state dict tensors unchanged, ``running_var`` being the
population variance, plus an int64 ``<layer>.num_samples`` per BN layer: the values per
channel behind its statistics. Metadata: ``fedmerge.format = "site-update/1"``, ``arch``,
``num_classes``, ``domain``, ``num_examples``. Any other model file is read too (through
``common.models.checkpoints.read_model_file``); without counts, they fall back to
``num_batches_tracked``, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.models.checkpoints import COUNT_SUFFIX, SITE_UPDATE_FORMAT, read_model_file, write_safetensors
from common.updates.site import SiteUpdate, bn_layer_names, site_label, split_state

__all__ = ["FORMAT", "load_site_update", "save_site_update"]

FORMAT = SITE_UPDATE_FORMAT
log = logging.getLogger(__name__)


def save_site_update(path: str | Path, update: SiteUpdate, arch: str, num_classes: int) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in update.state_dict().items()}
    for layer, n in update.counts.items():
        tensors[f"{layer}{COUNT_SUFFIX}"] = n.to(torch.int64).reshape(-1).contiguous()
    meta = {
        "fedmerge.format": FORMAT,
        "arch": arch,
        "num_classes": str(num_classes),
        "domain": update.site,
        "num_examples": str(update.num_examples),
    }
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return write_safetensors(path, layout, tensors.items(), meta)


def _num_examples(text: str, path: Path) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}: metadata num_examples {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{path}: metadata num_examples is {value} (must be at least 1)")
    return value


def load_site_update(path: str | Path, site: str | None = None) -> tuple[SiteUpdate, dict[str, str]]:
    """Read a site update (or any model file); ``site`` overrides the name recorded in the file."""
    file = read_model_file(path)
    counts = dict(file.counts)
    params, buffers = split_state(file.state)
    missing = [layer for layer in bn_layer_names(buffers) if layer not in counts]
    if missing:
        log.warning("%s: no sample counts for %d BN layers; using num_batches_tracked instead", path, len(missing))
        for layer in missing:
            nbt = buffers.get(f"{layer}.num_batches_tracked")
            if nbt is None or nbt.numel() != 1:
                raise ValueError(f"{path}: BN layer {layer!r} has neither sample counts nor one num_batches_tracked")
            counts[layer] = nbt.to(torch.int64).reshape(1).clone()
    name = site or site_label(file.meta.get("domain") or file.path.stem)
    num_examples = _num_examples(file.meta.get("num_examples", "1"), file.path)
    return SiteUpdate(name, params, buffers, counts, num_examples), file.meta
