"""Image corruptions a data spec can name: ``corruption=fog:4``.

A corrupted copy of a labeled set is a target domain whose shift is known and graded
(severity 1-5), so adaptation and merging can be scored against controlled weather, blur,
noise and light. The ImageNet-C corruptions (Hendrycks & Dietterich, 2019) come from the
``imagecorruptions`` package, the adaptation of that code to any image size behind
Cityscapes-C and COCO-C; ``night`` is defined here. Labels are never touched: a corruption
changes how a scene looks, not what it shows.

Every corruption is a pure function of (image, severity, seed), and the seed is derived from
a stable key of the image (its path inside the dataset) and the corruption's name, never from
global state, so the same file gives the same pixels in every run, process and thread count.
The seed leaves the severity out on purpose: severity 5 of an image is then the same fog
field, noise draw or frost crop as severity 1, only stronger, so severities compare cleanly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
import threading
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where a corruption runs: reading a data spec (--help) stays light
    import numpy as np

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corruption",
    "NightLevel",
    "corrupt",
    "corruption_seed",
    "load_imagecorruptions",
    "night",
]

SEVERITIES = range(1, 6)
MIN_SIDE = 32  # imagecorruptions refuses smaller images; night would work, but one rule is simpler to state

CorruptFn = Callable[["np.ndarray", int, int], "np.ndarray"]
"""(uint8 HxWx3 RGB, severity 1-5, seed) -> uint8 HxWx3 RGB."""


# ----------------------------------------------------------------------------- imagecorruptions


def _numpy_with_float_() -> types.ModuleType:
    """numpy as imagecorruptions 1.1.2 expects it: its fog builds its height map with ``np.float_``,
    which numpy 2 removed (it was float64)."""
    import numpy

    class Numpy2(types.ModuleType):
        float_ = numpy.float64

        def __getattr__(self, name: str) -> object:
            return getattr(numpy, name)

    return Numpy2("numpy")


@functools.cache
def load_imagecorruptions() -> types.ModuleType:
    """``imagecorruptions.corruptions``, made to run with today's setuptools and numpy.

    The module imports ``pkg_resources.resource_filename`` to find its bundled frost images, and the
    installed setuptools (84) has no ``pkg_resources``; a stand-in that resolves names inside the
    package is put in ``sys.modules`` for the import alone and removed again, so nothing else sees it.
    """
    package = importlib.util.find_spec("imagecorruptions")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("the corruptions need the 'imagecorruptions' package (pip install imagecorruptions)")
    folder = Path(next(iter(package.submodule_search_locations)))
    stand_in = None
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = lambda _module, name: str(folder / name)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy.ndimage.interpolation
            import imagecorruptions.corruptions as module
    finally:
        if stand_in is not None:
            del sys.modules["pkg_resources"]
    module.np = _numpy_with_float_()  # type: ignore[attr-defined]
    return module


_GLOBAL_RNG = threading.Lock()


def _library(name: str) -> CorruptFn:
    """An imagecorruptions corruption with its randomness pinned to ``seed``.

    The library draws from numpy's global generator. Each call seeds it, runs, and puts the
    previous state back, under one lock, so concurrent calls cannot interleave their draws and
    the caller's own use of ``np.random`` is left as it was.
    """

    def run(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
        import numpy as np
        from PIL import Image

        function = getattr(load_imagecorruptions(), name)
        with _GLOBAL_RNG:
            saved = np.random.get_state()
            np.random.seed(seed)
            try:
                out = function(Image.fromarray(image), severity)
            finally:
                np.random.set_state(saved)
        # truncated to uint8 as imagecorruptions.corrupt does (outputs are in 0..255); astype copies, so the
        # result is writable even where the library hands back a PIL image (jpeg_compression, pixelate)
        return np.asarray(out).astype(np.uint8)

    run.__name__ = name
    return run


# ----------------------------------------------------------------------------- night


@dataclass(frozen=True)
class NightLevel:
    """One severity of ``night``: how far the exposure drops and what the sensor adds back."""

    stops: float  # exposure drop in photographic stops (each halves the light)
    flare: float  # veiling glare / black level lifted uniformly, in display units: flattens contrast
    desaturation: float  # share of colour lost to luminance: colour vision fades in low light
    shot: float  # signal-dependent noise: variance = shot * linear signal
    read: float  # signal-independent noise std (read noise), in linear units


NIGHT_LEVELS = (
    NightLevel(stops=1.0, flare=0.02, desaturation=0.10, shot=0.002, read=0.002),
    NightLevel(stops=1.75, flare=0.03, desaturation=0.20, shot=0.004, read=0.003),
    NightLevel(stops=2.5, flare=0.04, desaturation=0.30, shot=0.006, read=0.004),
    NightLevel(stops=3.25, flare=0.05, desaturation=0.40, shot=0.009, read=0.006),
    NightLevel(stops=4.0, flare=0.06, desaturation=0.50, shot=0.012, read=0.008),
)
_GAMMA = 2.2  # display <-> linear light, close enough to sRGB for a corruption
_LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709 weights of linear RGB


def night(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """A day frame taken at night by the same camera: less light, flatter, noisier, greyer.

    Light is dimmed in linear units (``stops``), where a real exposure change acts; colour is
    pulled toward luminance; shot noise (growing with the signal) and read noise (constant) are
    added where the sensor adds them, before the display gamma, so dark regions end up noisiest
    relative to their signal; a uniform glare then lifts the blacks. No relighting: street lamps
    and headlights are not invented, which keeps the corruption a pure function of the image.
    """
    import numpy as np

    level = NIGHT_LEVELS[severity - 1]
    rng = np.random.default_rng(seed)
    linear = (image.astype(np.float32) / 255.0) ** _GAMMA * np.float32(2.0**-level.stops)
    luminance = linear @ np.array(_LUMA, np.float32)
    linear = linear + level.desaturation * (luminance[..., None] - linear)
    sigma = np.sqrt(level.shot * linear + level.read**2)
    linear = np.clip(linear + sigma * rng.standard_normal(linear.shape, dtype=np.float32), 0.0, 1.0)
    display = level.flare + (1.0 - level.flare) * linear ** (1.0 / _GAMMA)
    return (np.clip(display, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- the registry

# ImageNet-C's corruptions that run and repeat with the pinned libraries (benchmarks/corruption_libraries.py),
# plus night. Left out: glass_blur and gaussian_blur (they pass scikit-image an argument it no longer has),
# impulse_noise (scikit-image draws its own unseeded generator, so the same image would differ per call),
# and the extra validation corruptions and elastic_transform, which no experiment here needs yet.
CORRUPTIONS: dict[str, CorruptFn] = {
    name: _library(name)
    for name in (
        "fog",
        "frost",
        "snow",
        "motion_blur",
        "defocus_blur",
        "zoom_blur",
        "gaussian_noise",
        "shot_noise",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
    )
} | {"night": night}


def corruption_seed(key: str, name: str) -> int:
    """A 32-bit seed (what ``np.random.seed`` takes) from the image's key and the corruption's name."""
    digest = hashlib.sha256(f"{name}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class Corruption:
    """A corruption and its severity, as a data spec writes it: ``fog:4``."""

    name: str
    severity: int

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {self.name!r}; known corruptions: {', '.join(CORRUPTIONS)}")
        if isinstance(self.severity, bool) or not isinstance(self.severity, int) or self.severity not in SEVERITIES:
            raise ValueError(
                f"corruption {self.name!r}: severity must be an integer 1 to 5, not {self.severity!r}; "
                f"known corruptions: {', '.join(CORRUPTIONS)}"
            )

    @classmethod
    def parse(cls, text: str) -> Corruption:
        """``NAME:SEVERITY``, e.g. ``fog:4``."""
        name, sep, severity = text.strip().partition(":")
        if not sep or not severity.strip().isdigit():
            raise ValueError(
                f"corruption {text!r}: expected NAME:SEVERITY with severity 1 to 5, e.g. fog:4; "
                f"known corruptions: {', '.join(CORRUPTIONS)}"
            )
        return cls(name.strip(), int(severity))

    def __str__(self) -> str:
        return f"{self.name}:{self.severity}"


def corrupt(image: np.ndarray, corruption: Corruption, key: str) -> np.ndarray:
    """``image`` (uint8 HxWx3 RGB) under ``corruption``, seeded by ``key`` (the image's path in its set)."""
    import numpy as np

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(
            f"corruption {corruption}: images must be at least {MIN_SIDE}x{MIN_SIDE} pixels, "
            f"this one is {image.shape[0]}x{image.shape[1]}"
        )
    seed = corruption_seed(key, corruption.name)
    out = CORRUPTIONS[corruption.name](np.ascontiguousarray(image), corruption.severity, seed)
    if out.shape != image.shape:  # a corruption must never change the geometry the label relies on
        raise ValueError(f"corruption {corruption} returned shape {out.shape} for an image of {image.shape}")
    return out
