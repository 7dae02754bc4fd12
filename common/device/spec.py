"""The device and mixed-precision settings as text, checked without importing torch.

A run config, a node config, an experiment file and every command name the device the
same way, so one reader refuses a bad value before anything starts; whether this machine
has what the value asks for is ``common.device.runtime``'s question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AMP_MODES", "DEVICE_CHOICES", "Compute", "DeviceError", "check_amp", "check_device", "check_num_gpus"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
AMP_MODES = ("off", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(ValueError):
    """A device or precision that is misspelt, or that this machine cannot give: one line, naming it."""


def check_device(text: str) -> str:
    if not isinstance(text, str) or not _DEVICE.fullmatch(text):
        raise DeviceError(f"device must be {DEVICE_CHOICES}, not {text!r}")
    return text


def check_amp(text: str) -> str:
    if text not in AMP_MODES:
        raise DeviceError(f"amp must be one of {', '.join(AMP_MODES)}, not {text!r}")
    return text


def check_num_gpus(value: float) -> float:
    """Ray's share of a GPU per simulated site: 0 (none), a fraction (sites share one), or whole GPUs."""
    if not value >= 0:
        raise DeviceError(f"num-gpus must be >= 0, not {value}")
    return value


@dataclass(frozen=True)
class Compute:
    """The device a site's models run on and the autocast precision of its training and evaluation.

    ``device`` is the setting as written (``auto`` included) until
    ``common.device.runtime.resolve_compute`` makes it a concrete device of this machine.
    The default, the CPU at full precision, is the one whose results are the same bits on
    every machine.
    """

    device: str = "cpu"
    amp: str = "off"

    def __post_init__(self) -> None:
        check_device(self.device)
        check_amp(self.amp)

    @property
    def device_type(self) -> str:
        return self.device.partition(":")[0]

    def recipe(self) -> dict[str, str]:
        """Its part of a cache key: nothing on the CPU at full precision, so what was cached before stays valid.

        Only the kind of device counts (``cuda:1`` computes what ``cuda:0`` does).
        """
        if self.device_type == "cpu" and self.amp == "off":
            return {}
        return {"compute": f"{self.device_type}/{self.amp}"}
