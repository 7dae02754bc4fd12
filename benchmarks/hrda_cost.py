"""HRDA's cost on CPU: seconds per step against a plain supervised step of the same model, and a site's budget.

Both are timed on CamVid at 180x240 with batch 2 (source and target), in one process:
a plain step is one forward, backward and AdamW step of the base model on a labeled
source batch; an HRDA step is the whole ``hrda`` method step on ``hrda_<arch>``
(multi-resolution source loss, teacher pseudo-labels by sliding windows, ClassMix,
strong augmentation, mixed loss, EMA update), timed in steady state after a warm-up,
with the site's fixed costs (AdaBN start, BN refreshes, the exact statistics pass)
measured apart. A site's time is projected from these for the configured steps.

    .venv/bin/python benchmarks/hrda_cost.py --threads 2 --steps 500
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

from clients.adaptation import METHODS, AdaptContext  # noqa: E402
from clients.adaptation.sampling import labeled_batch  # noqa: E402
from clients.site import SiteJob, package_update  # noqa: E402
from common.data import DataSpec, build_dataset  # noqa: E402
from common.models.factory import build_model  # noqa: E402

CAMVID = str(ROOT.parent / "shared" / "data" / "camvid")
SOURCE = f"camvid:{CAMVID}?split=all&domain=0016E5"
TARGET = f"camvid:{CAMVID}?split=all&domain=0001TP&time=first:45"
CLASSES = 11  # CamVid's


def plain_step_seconds(arch: str, repeats: int, source_spec: str = SOURCE, num_classes: int = CLASSES) -> float:
    model = build_model(arch, num_classes).train()
    source = build_dataset(DataSpec.parse(source_spec))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    images, labels = labeled_batch(source, [0, 1])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels, ignore_index=255).backward()
        opt.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def hrda_seconds(
    arch: str, steps: int, options: dict[str, str], source_spec: str = SOURCE, target_spec: str = TARGET,
    num_classes: int = CLASSES,
) -> float:  # fmt: skip
    source = build_dataset(DataSpec.parse(source_spec))
    target = build_dataset(DataSpec.parse(target_spec))
    method = METHODS.get("hrda")
    config = method.make_options({"steps": steps, "warmup": 1, "bn-refresh": 10**6, **options})
    started = time.perf_counter()
    model = build_model(f"hrda_{arch}", num_classes)
    method.load()(model, target, AdaptContext(source=source, progress=False), config)
    return time.perf_counter() - started


def fixed_seconds(arch: str) -> float:
    """AdaBN start and the exact statistics pass: what a site pays whatever its steps."""
    target = build_dataset(DataSpec.parse(f"camvid:{CAMVID}?split=all&domain=0001TP&time=first:45"))
    started = time.perf_counter()
    package_update(build_model(f"hrda_{arch}", 11), target, SiteJob("dusk", "adabn"), 0.0)
    return 2 * (time.perf_counter() - started)  # the start's AdaBN pass costs about one statistics pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="small_unet")
    parser.add_argument("--steps", type=int, default=500, help="the site's configured steps, for the projection")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an hrda option")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = dict(item.split("=", 1) for item in args.set)
    plain = plain_step_seconds(args.arch, 10)
    short, long = hrda_seconds(args.arch, 4, options), hrda_seconds(args.arch, 24, options)
    per_step = (long - short) / 20
    fixed = fixed_seconds(args.arch)
    refreshes = args.steps // int(options.get("bn-refresh", 100))
    site = fixed + per_step * args.steps + refreshes * fixed / 2
    print(f"threads {args.threads}, {args.arch} at 180x240, batch 2, options {options or 'default'}")
    print("| plain step s | hrda step s | hrda / plain | fixed costs s | steps | projected site time |")
    print("|---|---|---|---|---|---|")
    print(f"| {plain:.3f} | {per_step:.3f} | {per_step / plain:.1f}x | {fixed:.0f} | {args.steps} | "
          f"{site / 60:.1f} min |")  # fmt: skip


if __name__ == "__main__":
    main()
