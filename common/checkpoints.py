"""Model checkpoints: a safetensors state dict whose metadata says how to rebuild the model.

The metadata (format, arch, num_classes, class names) travels inside the file, so a
checkpoint can be loaded, merged or evaluated without any side file or guess.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from common.models import Segmenter, build_model

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "read_checkpoint_metadata", "save_checkpoint", "save_state"]

CHECKPOINT_FORMAT = "checkpoint/1"


def save_checkpoint(
    model: Segmenter, path: str | Path, arch: str, classes: Sequence[str], extra: dict[str, str] | None = None
) -> Path:
    """Write ``model`` with its rebuild recipe; ``extra`` adds provenance (e.g. the training data)."""
    path = Path(path)
    num_classes = model.final_layer().out_channels
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} outputs")
    if any("," in name for name in classes):
        raise ValueError("class names are stored comma-separated and must not contain commas")
    return save_state(model.state_dict(), path, arch, num_classes, {"classes": ",".join(classes), **(extra or {})})


def save_state(
    state: Mapping[str, Tensor], path: str | Path, arch: str, num_classes: int, extra: dict[str, str] | None = None
) -> Path:
    """Write a state dict as a ``checkpoint/1`` file, atomically: a crash never leaves half a file.

    The one writer of the format, for a trained model, a merged one and a merge from files.
    """
    path = Path(path)
    metadata = {"fedmerge.format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": str(num_classes), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path}: not a safetensors checkpoint ({exc})") from None


def load_checkpoint(path: str | Path, classes: Sequence[str] | None = None) -> tuple[Segmenter, dict[str, str]]:
    """Rebuild the model in eval mode; with ``classes``, refuse a checkpoint trained on other classes.

    Every mismatch (format, missing recipe, class list, tensor shapes) is one ValueError
    naming the file, never a half-loaded model.
    """
    meta = read_checkpoint_metadata(path)
    fmt = meta.get("fedmerge.format")
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a fedmerge checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})")
    arch, num = meta.get("arch", ""), meta.get("num_classes", "")
    if not arch or not num.isdigit():
        raise ValueError(f"{path}: checkpoint metadata lacks arch or num_classes (arch={arch!r}, num_classes={num!r})")
    names = [n for n in meta.get("classes", "").split(",") if n]
    if names and len(names) != int(num):
        raise ValueError(f"{path}: metadata lists {len(names)} classes but num_classes is {num}")
    if classes is not None and (int(num) != len(classes) or (names and list(classes) != names)):
        have = ", ".join(names) if names else f"{num} classes"
        raise ValueError(f"{path}: checkpoint predicts [{have}], the data has [{', '.join(classes)}]")
    model = build_model(arch, int(num), weights=path)
    return model.eval(), meta
