"""Model files: what fedmerge writes and reads, and the one loader every command uses.

Two formats are written, both safetensors with their recipe in the metadata so a file
can be loaded, merged or evaluated without any side file or guess:

- ``checkpoint/1``: a model (trained, merged); metadata ``arch``, ``num_classes``, class names;
- ``site-update/1`` (``common.updates.files``): a site's adapted model plus the sample
  counts behind its BN statistics.

Plain PyTorch state dicts are read too (``weights_only``, never executing pickled code).
A checkpoint is written tensor by tensor: the merged model can stream from the merge
sums straight to disk, and a value that is not finite stops the write before the file
appears, so a crash or a bad merge never leaves half a file or a file full of NaN.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from common.bn.bank import BANK_PREFIX, BNBank, bank_from_checkpoint
from common.models.banked import BankedSegmenter
from common.models.catalog import HRDA_PREFIX
from common.models.factory import build_model
from common.models.multires import MultiResSegmenter
from common.models.segmenter import Segmenter

__all__ = [
    "CHECKPOINT_FORMAT",
    "COUNT_SUFFIX",
    "SITE_UPDATE_FORMAT",
    "ModelFile",
    "load_checkpoint",
    "read_model_file",
    "save_checkpoint",
    "save_state",
    "wrap_checkpoint_for_hrda",
    "write_safetensors",
]

CHECKPOINT_FORMAT = "checkpoint/1"
SITE_UPDATE_FORMAT = "site-update/1"
COUNT_SUFFIX = ".num_samples"  # a site update's per-BN-layer sample counts
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _header(layout: Layout, metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, (shape, dtype) in layout.items():
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{key!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes


def _tensor_bytes(key: str, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> memoryview:
    """The tensor's bytes without a copy, once its layout matches and every value is finite."""
    tensor = tensor.detach().cpu()
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(f"{key!r}: {tensor.dtype} {tuple(tensor.shape)}, the layout says {dtype} {tuple(shape)}")
    # A sum is finite only if every value is (or it overflowed: then count exactly).
    screen = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=screen))):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{key!r}: {bad} NaN or Inf values; nothing written")
    flat = tensor.contiguous().reshape(-1)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


def write_safetensors(
    path: str | Path, layout: Layout, tensors: Iterable[tuple[str, Tensor]], metadata: Mapping[str, str]
) -> Path:
    """Write ``tensors`` (in ``layout``'s order) as safetensors, one at a time, atomically.

    The header comes from ``layout``, so no tensor needs to exist before its turn. The
    file appears under its name only when every tensor was finite and written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = _header(layout, metadata)
    try:
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            expected = iter(layout.items())
            for key, tensor in tensors:
                want, (shape, dtype) = next(expected, (None, ((), torch.float32)))
                if key != want:
                    raise ValueError(f"tensor {key!r} came where the layout has {want!r}")
                f.write(_tensor_bytes(key, tensor, shape, dtype))
            missing = next(expected, None)
            if missing is not None:
                raise ValueError(f"tensor {missing[0]!r} of the layout was never given")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_state(
    state: Mapping[str, Tensor], path: str | Path, arch: str, num_classes: int, extra: dict[str, str] | None = None
) -> Path:
    """Write a state dict as a ``checkpoint/1`` file: the one writer of the format."""
    layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return write_safetensors(path, layout, state.items(), checkpoint_metadata(arch, num_classes, extra))


def checkpoint_metadata(arch: str, num_classes: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"fedmerge.format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": str(num_classes), **(extra or {})}


def save_checkpoint(
    model: Segmenter, path: str | Path, arch: str, classes: Sequence[str], extra: dict[str, str] | None = None
) -> Path:
    """Write ``model`` with its rebuild recipe; ``extra`` adds provenance (e.g. the training data)."""
    num_classes = model.final_layer().out_channels
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} outputs")
    if any("," in name for name in classes):
        raise ValueError("class names are stored comma-separated and must not contain commas")
    return save_state(model.state_dict(), path, arch, num_classes, {"classes": ",".join(classes), **(extra or {})})


@dataclass(frozen=True)
class ModelFile:
    """A model read from any file fedmerge understands: its tensors, its recipe, its counts."""

    path: Path
    kind: str  # "checkpoint", "site-update" or "state-dict"
    state: dict[str, Tensor]
    counts: dict[str, Tensor]  # BN layer -> values per channel (site updates only)
    meta: dict[str, str]
    bank: BNBank | None = None  # per-site BN statistics shipped with a merged model

    @property
    def arch(self) -> str:
        return self.meta.get("arch", "")

    @property
    def num_classes(self) -> int:
        text = self.meta.get("num_classes", "")
        return int(text) if text.isdigit() else 0

    @property
    def classes(self) -> list[str]:
        return [c for c in self.meta.get("classes", "").split(",") if c]


_KINDS = {CHECKPOINT_FORMAT: "checkpoint", SITE_UPDATE_FORMAT: "site-update", None: "state-dict"}


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file it cannot unpickle safely
        if isinstance(exc, pickle.UnpicklingError):  # torch's text runs to many lines and suggests the unsafe load
            reason = "it holds objects other than tensors, which are never unpickled: that could run code"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable safetensors or PyTorch file ({reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return obj


def read_model_file(path: str | Path) -> ModelFile:
    """Any model file: ``checkpoint/1``, ``site-update/1``, other safetensors, or a PyTorch state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
    else:
        tensors, meta = _read_torch(path), {}
    fmt = meta.get("fedmerge.format")
    if fmt not in _KINDS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected {CHECKPOINT_FORMAT!r} or {SITE_UPDATE_FORMAT!r}")
    counts = {k[: -len(COUNT_SUFFIX)]: tensors.pop(k) for k in list(tensors) if k.endswith(COUNT_SUFFIX)}
    bank_tensors = {k: tensors.pop(k) for k in list(tensors) if k.startswith(BANK_PREFIX)}
    try:
        bank = bank_from_checkpoint(bank_tensors, meta, tensors)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: a BN bank that does not fit together ({exc})") from None
    return ModelFile(path, _KINDS[fmt], tensors, counts, meta, bank)


def load_checkpoint(
    path: str | Path, classes: Sequence[str] | None = None, with_bank: bool = True
) -> tuple[Segmenter, dict[str, str]]:
    """Rebuild the model in eval mode from a checkpoint or a site update; ``classes`` checks the class list.

    A BN bank or image weight the file carries is for prediction; ``with_bank=False`` gives the
    plain model beneath it, to train on or to re-wrap.

    Every mismatch (missing recipe, class list, tensor shapes) is one ValueError naming
    the file, never a half-loaded model.
    """
    file = read_model_file(path)
    if not file.arch or file.num_classes < 1:
        raise ValueError(
            f"{path}: the file does not say which model it holds (arch={file.arch!r}, "
            f"num_classes={file.meta.get('num_classes', '')!r}); it is not a fedmerge checkpoint or site update"
        )
    names = file.classes
    if names and len(names) != file.num_classes:
        raise ValueError(f"{path}: metadata lists {len(names)} classes but num_classes is {file.num_classes}")
    if classes is not None and (file.num_classes != len(classes) or (names and list(classes) != names)):
        have = ", ".join(names) if names else f"{file.num_classes} classes"
        raise ValueError(f"{path}: checkpoint predicts [{have}], the data has [{', '.join(classes)}]")
    model = build_model(file.arch, file.num_classes, weights=path)
    if file.bank is not None and with_bank:
        model = BankedSegmenter(model, file.bank)
    return model.eval(), dict(file.meta)


def wrap_checkpoint_for_hrda(source: str | Path, out: str | Path) -> Path:
    """Write the shared starting checkpoint of HRDA sites: the source model, wrapped.

    Every hrda site must start from the same attention head for the merge to average
    like with like; this file (arch ``hrda_<base>``) is what the federation distributes.
    """
    base, meta = load_checkpoint(source, with_bank=False)
    if meta["arch"].startswith(HRDA_PREFIX):
        raise ValueError(f"{source}: already a multi-resolution checkpoint ({meta['arch']})")
    num_classes = int(meta["num_classes"])
    classes = [c for c in meta.get("classes", "").split(",") if c] or [f"class{i}" for i in range(num_classes)]
    extra = {k: v for k, v in meta.items() if k not in ("fedmerge.format", "arch", "num_classes", "classes")}
    wrapped = MultiResSegmenter(base, num_classes)
    return save_checkpoint(wrapped, out, HRDA_PREFIX + meta["arch"], classes, {**extra, "wrapped-from": str(source)})
