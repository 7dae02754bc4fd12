"""Which corruption library to use for ``corruption=NAME:SEVERITY``: does each corruption run, how fast, how faithful.

Run once per candidate library (each brings its own OpenCV build, so they live apart):

    PYTHONPATH=. .venv/bin/python benchmarks/corruption_libraries.py --library imagecorruptions
    PYTHONPATH=.:/path/to/albumentations .venv/bin/python benchmarks/corruption_libraries.py --library albumentations

For every corruption it prints whether it runs with the installed numpy / scikit-image / scipy /
setuptools, the median milliseconds per 240x180 image over the frames and severities 1-5, whether the
same seed gives the same bytes twice, and the mean absolute change of the pixels (0-255) at severity 1
and 5: a severity ladder that grows is the least a severity scale must give. imagecorruptions is tried
as installed (``import``) and through the shim in ``common/data/corruptions.py``; albumentations has no
severity scale of its own, so ``ALBUMENTATIONS`` below maps 1-5 onto its parameters, taking the
ImageNet-C constants where its parameters mean the same thing.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.data.corruptions import CORRUPTIONS, SEVERITIES, load_imagecorruptions, night  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid"
WANTED = ("fog", "frost", "snow", "motion_blur", "defocus_blur", "gaussian_noise", "brightness", "contrast", "night")

Apply = Callable[[np.ndarray, int, int], np.ndarray]  # (uint8 image, severity, seed) -> image


@dataclass(frozen=True)
class Row:
    name: str
    runs: str  # "yes" or the first error line
    ms: float | None
    same_bytes: bool | None
    change_s1: float | None
    change_s5: float | None


def frames(count: int) -> tuple[list[np.ndarray], str]:
    """CamVid test frames (240x180) when the shared copy is there, else synthetic frames of that size."""
    files = sorted((CAMVID / "test").glob("*.png"))[:count]
    if files:
        from PIL import Image

        return [np.asarray(Image.open(f).convert("RGB")) for f in files], f"{len(files)} CamVid test frames"
    from common.data.synthetic import render

    return [render("source", i, 0, (180, 240))[0] for i in range(count)], f"{count} synthetic source frames"


def measure(name: str, apply: Apply, images: list[np.ndarray]) -> Row:
    try:
        apply(images[0], 3, 1)
    except Exception as exc:
        return Row(name, f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:70]}", None, None, None, None)
    seconds, change = [], {1: [], 5: []}
    for i, image in enumerate(images):
        for severity in SEVERITIES:
            start = time.perf_counter()
            out = apply(image, severity, i)
            seconds.append(time.perf_counter() - start)
            if severity in change:
                change[severity].append(float(np.abs(out.astype(np.float32) - image).mean()))
    same = bool(np.array_equal(apply(images[0], 3, 7), apply(images[0], 3, 7)))
    ms = 1000 * statistics.median(seconds)
    return Row(name, "yes", ms, same, statistics.mean(change[1]), statistics.mean(change[5]))


def imagecorruptions_rows(images: list[np.ndarray]) -> list[Row]:
    rows = []
    try:
        importlib.import_module("imagecorruptions")
        print("import imagecorruptions as installed: ok")
    except Exception as exc:
        print(f"import imagecorruptions as installed: {type(exc).__name__}: {exc}")
    module = load_imagecorruptions()
    every = importlib.import_module("imagecorruptions").get_corruption_names("all")  # 15 common + 4 validation

    def library(name: str) -> Apply:
        def apply(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
            from PIL import Image

            np.random.seed(seed)
            return np.uint8(getattr(module, name)(Image.fromarray(image), severity))

        return apply

    for name in every:
        rows.append(measure(name, library(name), images))
    rows.append(measure("night (ours, numpy)", night, images))
    shimmed, module.np = module.np, np
    try:
        runs = [r.name for r in rows[:-1] if r.ms is not None]
        broken = [name for name in runs if measure(name, library(name), images[:1]).ms is None]
    finally:
        module.np = shimmed
    print(f"run through the shim, fail with numpy {np.__version__} as it is (np.float_): {', '.join(broken) or 'none'}")
    return rows


def _albumentations_transform(name: str, severity: int) -> object | None:
    import albumentations as A

    s = severity - 1
    if name == "fog":
        return A.RandomFog(fog_coef_range=((0.2, 0.35, 0.5, 0.65, 0.8)[s],) * 2, alpha_coef=0.08, p=1)
    if name == "snow":
        return A.RandomSnow(snow_point_range=((0.1, 0.2, 0.3, 0.4, 0.5)[s],) * 2, brightness_coeff=2.5, p=1)
    if name == "motion_blur":  # ImageNet-C radius r -> a kernel of 2r + 1
        k = (21, 31, 31, 31, 41)[s]
        return A.MotionBlur(blur_limit=(k, k), angle_range=(0, 360), p=1)  # it refuses ImageNet-C's -45..45
    if name == "defocus_blur":  # ImageNet-C (radius, alias blur)
        radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[s]
        return A.Defocus(radius=(radius, radius), alias_blur=(alias, alias), p=1)
    if name == "gaussian_noise":  # ImageNet-C std as a fraction of 255
        c = (0.08, 0.12, 0.18, 0.26, 0.38)[s]
        return A.GaussNoise(std_range=(c, c), p=1)
    if name == "brightness":
        c = (0.1, 0.2, 0.3, 0.4, 0.5)[s]
        return A.RandomBrightnessContrast(brightness_limit=(c, c), contrast_limit=(0, 0), p=1)
    if name == "contrast":  # ImageNet-C keeps this share of the contrast
        c = (0.4, 0.3, 0.2, 0.1, 0.05)[s]
        return A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(c - 1, c - 1), p=1)
    return None  # frost: no such transform


def albumentations_rows(images: list[np.ndarray]) -> list[Row]:
    import albumentations as A

    print(f"albumentations {A.__version__}")

    def library(name: str) -> Apply:
        def apply(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
            transform = _albumentations_transform(name, severity)
            if transform is None:
                raise LookupError(f"albumentations has no {name} transform")
            return A.Compose([transform], seed=seed)(image=image)["image"]

        return apply

    return [measure(name, library(name), images) for name in WANTED if name != "night"]


def cache_worth(count: int) -> None:
    """Would caching corrupted frames pay? Compare one item read with and without a corruption to one
    training step's share per image (small_unet, forward and backward, batch 8 at 180x240, one thread)."""
    if not (CAMVID / "test").is_dir():
        print("no CamVid copy: cache comparison skipped")
        return
    import torch

    from common.data import DataSpec, build_dataset
    from common.models.factory import build_model

    torch.set_num_threads(1)
    base = f"camvid:{CAMVID}?split=test&domain=Seq05VD&n={count}"
    for corruption in ("", "&corruption=fog:3", "&corruption=snow:3", "&corruption=zoom_blur:3"):
        dataset = build_dataset(DataSpec.parse(base + corruption))
        dataset[0]  # imports and first-call set-up out of the timing
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        per_item = 1000 * (time.perf_counter() - start) / len(dataset)
        print(f"read one item {corruption.lstrip('&') or '(clean)'}: {per_item:.1f} ms")
    model = build_model("small_unet", 11)
    batch = torch.rand(8, 3, 180, 240)
    model(batch).mean().backward()
    start = time.perf_counter()
    for _ in range(3):
        model(batch).mean().backward()
    print(f"small_unet train step per image (batch 8): {1000 * (time.perf_counter() - start) / 24:.1f} ms")


def table(rows: list[Row]) -> str:
    lines = ["| corruption | runs | ms / image | same seed, same bytes | mean abs change s1 | s5 |"]
    lines.append("|---|---|---:|---|---:|---:|")
    for r in rows:
        if r.ms is None:
            lines.append(f"| {r.name} | {r.runs} | - | - | - | - |")
            continue
        same = "yes" if r.same_bytes else "NO"
        lines.append(f"| {r.name} | yes | {r.ms:.1f} | {same} | {r.change_s1:.1f} | {r.change_s5:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("imagecorruptions", "albumentations"), required=True)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    images, what = frames(args.frames)
    print(f"{what}, {images[0].shape[1]}x{images[0].shape[0]}, severities 1-5, one thread")
    rows = imagecorruptions_rows(images) if args.library == "imagecorruptions" else albumentations_rows(images)
    print(table(rows))
    if args.library == "imagecorruptions":
        cache_worth(args.frames)
        print(f"registry of common/data/corruptions.py: {', '.join(CORRUPTIONS)}")


if __name__ == "__main__":
    main()
