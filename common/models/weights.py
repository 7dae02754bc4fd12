"""Weights files: read a state dict safely from safetensors or PyTorch files, and load it into a module.

PyTorch files are read with ``weights_only=True``, so a file can never execute code; a
file that does not fit the module is refused with the first mismatched tensor named.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["WeightsFile", "load_into", "load_weights_file", "strip_prefixes"]

WeightsFile = str | Path | None  # a local weights file; nothing is ever downloaded


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a PyTorch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def load_into(module: nn.Module, state: dict[str, Tensor], what: str, path: Path, strict: bool) -> None:
    target = module.state_dict()
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{path}: {what} tensor {k!r} has shape {tuple(state[k].shape)}, "
            f"the model expects {tuple(target[k].shape)} ({len(mismatched)} mismatched in all)"
        )
    missing = sorted(set(target) - set(state))
    if strict and missing:
        raise ValueError(f"{path}: {what} weights lack {len(missing)} tensors, first {missing[0]!r}")
    if not set(state) & set(target):
        raise ValueError(f"{path}: no tensor name matches the {what}; is this the right architecture?")
    # Completed with the module's own tensors, the state loads strictly: some library modules (smp's MiT
    # encoder) override load_state_dict without a `strict` argument.
    module.load_state_dict({**target, **{k: v for k, v in state.items() if k in target}})
