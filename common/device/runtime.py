"""What a device setting means on this machine: the torch device, autocast and loss scaling.

Everything a site computes runs where its model's parameters are: the functions that take
a model and images move the images to ``model_device(model)``, and what leaves a site is
copied back to the CPU. So a caller chooses the device once, by moving the model.

Random draws (batch indices, ClassMix classes, crops, flips, augmentation strengths) stay
on CPU generators and only their results move: a run on a GPU then sees exactly the
batches, masks and crops a CPU run sees, and a CPU run draws what it always drew.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from common.device.spec import Compute, DeviceError, check_device

__all__ = [
    "AMP_DTYPES",
    "Precision",
    "autocast",
    "full_precision",
    "model_device",
    "resolve_compute",
    "resolve_device",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(text: str) -> torch.device:
    """``auto`` -> the current CUDA device when torch sees one, else the CPU; ``cuda[:N]`` must exist here."""
    check_device(text)
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {text!r} asked for, but torch sees no CUDA device on this machine; "
                          "use device 'cpu' or 'auto'")  # fmt: skip
    if text == "auto" or text == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(text.partition(":")[2]), torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {text!r} asked for, but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _check_amp_on(device: torch.device, amp: str) -> None:
    if amp == "off":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise DeviceError(f"amp {amp!r}: torch has no autocast for device {device}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"amp 'bf16': the GPU {torch.cuda.get_device_name(device)} has no bfloat16; use 'fp16'")


def resolve_compute(compute: Compute) -> Compute:
    """The setting as this machine runs it: a concrete device, and a precision that device has."""
    device = resolve_device(compute.device)
    _check_amp_on(device, compute.amp)
    return Compute(str(device), compute.amp)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter or buffer (the CPU for an empty module)."""
    first = next(chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def autocast(device: torch.device | str, amp: str) -> AbstractContextManager[Any]:
    """Autocast to ``amp``'s dtype on ``device``; nothing at all for ``off``, so full precision is the old code path."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


def full_precision(device: torch.device | str) -> AbstractContextManager[Any]:
    """Autocast off inside an autocast region (the exact statistics pass measures float32 activations)."""
    kind = torch.device(device).type
    if not torch.is_autocast_enabled(kind):
        return nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


class Precision:
    """The precision of one training run: autocast for its forwards, loss scaling for fp16.

    fp16 gradients underflow without scaling; bf16 has float32's range and needs none. At
    ``off`` every call is what the code did before mixed precision existed: ``backward``
    is ``loss.backward()`` and ``step`` is ``optimizer.step()``.
    """

    def __init__(self, device: torch.device | str = "cpu", amp: str = "off") -> None:
        self.device, self.amp = torch.device(device), amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device, self.amp)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimiser step (skipped by the scaler when fp16 gradients overflowed), then the scale's update."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The loss scale, for a resumed run to go on with (empty unless fp16)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
