"""The site-update file: what a site's adapted model looks like on disk.

One safetensors file holds the state dict tensors unchanged, ``running_var`` being the
population variance, plus an int64 ``<layer>.num_samples`` per BN layer: the values per
channel behind its statistics. Metadata: ``fedmerge.format = "site-update/1"``, ``arch``,
``num_classes``, ``domain``, ``num_examples``. Plain PyTorch state dicts are read too;
their counts fall back to ``num_batches_tracked``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from common.merging import SiteUpdate, bn_layer_names, split_state

__all__ = ["FORMAT", "SiteUpdateMeta", "load_site_update", "save_site_update"]

FORMAT = "site-update/1"
_COUNT_SUFFIX = ".num_samples"
log = logging.getLogger(__name__)


class SiteUpdateMeta(dict):
    """The file's string metadata (``arch``, ``num_classes``, ``domain``, ...)."""


def save_site_update(path: str | Path, update: SiteUpdate, arch: str, num_classes: int) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in update.state_dict().items()}
    for layer, n in update.counts.items():
        tensors[f"{layer}{_COUNT_SUFFIX}"] = n.to(torch.int64).reshape(-1).contiguous()
    meta = {
        "fedmerge.format": FORMAT,
        "arch": arch,
        "num_classes": str(num_classes),
        "domain": update.site,
        "num_examples": str(update.num_examples),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return obj


def load_site_update(path: str | Path, site: str | None = None) -> tuple[SiteUpdate, SiteUpdateMeta]:
    """Read a site update; ``site`` overrides the name recorded in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"site update not found: {path}")
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        if meta.get("fedmerge.format") not in (None, FORMAT):
            raise ValueError(f"{path}: format {meta['fedmerge.format']!r}, expected {FORMAT!r}")
    else:
        tensors, meta = _read_torch(path), {}
    counts = {k[: -len(_COUNT_SUFFIX)]: tensors.pop(k) for k in list(tensors) if k.endswith(_COUNT_SUFFIX)}
    params, buffers = split_state(tensors)
    missing = [layer for layer in bn_layer_names(buffers) if layer not in counts]
    if missing:
        log.warning("%s: no sample counts for %d BN layers; using num_batches_tracked instead", path, len(missing))
        for layer in missing:
            counts[layer] = buffers[f"{layer}.num_batches_tracked"].to(torch.int64).reshape(1).clone()
    name = site or meta.get("domain") or path.stem
    num_examples = int(meta.get("num_examples", 1))
    update = SiteUpdate(name, params, buffers, counts, num_examples)
    return update, SiteUpdateMeta(meta)
