"""The synthetic generator's cost next to the training it feeds: render time per image against one
training step per image of the model the synthetic presets use, in one process.

A ratio well under 1 means generating the embedded data never holds a site back. This replaced a
timed assertion in the tests (timings on a shared machine are noise there).

    .venv/bin/python benchmarks/synthetic_speed.py --images 48 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.data.synthetic import SYNTHETIC_STYLES, render  # noqa: E402
from common.models.factory import build_model  # noqa: E402


def render_seconds(style: str, images: int) -> float:
    """CPU seconds per rendered image (CPU time: other processes on a busy machine do not count)."""
    start = time.process_time()
    for i in range(images):
        render(style, i)
    return (time.process_time() - start) / images


def step_seconds_per_image(arch: str, batch: int, steps: int) -> float:
    image, _ = render("source", 0)
    h, w = image.shape[:2]
    model = build_model(arch, 9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch, 3, h, w), torch.randint(0, 9, (batch, h, w))
    for i in range(steps + 1):
        if i == 1:  # the first step warms up the allocator and kernels
            start = time.process_time()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.process_time() - start) / (steps * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--arch", default="small_unet")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step = step_seconds_per_image(args.arch, 8, args.steps)
    print(f"{args.arch} training step: {1000 * step:.1f} ms per image ({args.threads} thread(s))")
    print("| style | render ms/image | render / step |")
    print("|---|---:|---:|")
    for style in SYNTHETIC_STYLES:
        seconds = render_seconds(style, args.images)
        print(f"| {style} | {1000 * seconds:.1f} | {seconds / step:.2f} |")


if __name__ == "__main__":
    main()
