"""Every adaptation method on the synthetic styles: source-only, adabn, tent, selftrain, sfda, hrda.

A small_unet is pretrained on the clean "source" style (400 images, seed 0; the recipe of
benchmarks/synthetic_gap.py) and cached. Each method then adapts it on 48 unlabeled images
of a target style (seed 1) and is scored on 48 held-out images of that style (seed 2,
scenes never seen by any method). hrda runs on hrda_small_unet (the source model wrapped
with a fresh attention head) with the 400 labeled source images at the site.

    .venv/bin/python benchmarks/adaptation_synthetic.py                 # all methods, fog/night/rain
    .venv/bin/python benchmarks/adaptation_synthetic.py --methods adabn,sfda --set sfda:bn=frozen
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adaptation_runner import Target, add_common_arguments, run_all  # benchmarks/, beside this file

from common.data import DataSpec, build_dataset, dataset_classes
from common.training.pretrain import PretrainPlan, pretrain_to_file

TRAIN_SEED, ADAPT_SEED, EVAL_SEED = 0, 1, 2
METHODS = ("source-only", "adabn", "tent", "selftrain", "sfda", "hrda")


def source_checkpoint(path: Path, images: int, steps: int) -> Path:
    """The cached source model, pretrained on first use."""
    if path.is_file():
        return path
    spec = DataSpec("synthetic", domain="source", num_images=images, seed=TRAIN_SEED)
    return pretrain_to_file(PretrainPlan(spec, steps=steps), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="fog,night,rain")
    parser.add_argument("--source-images", type=int, default=400)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--adapt-images", type=int, default=48)
    parser.add_argument("--eval-images", type=int, default=48)
    parser.add_argument("--work-dir", default="runs/adapt_synthetic", help="the cached source model goes here")
    add_common_arguments(parser, METHODS, "runs/adapt_synthetic/results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    ckpt = source_checkpoint(work / "source.safetensors", args.source_images, args.pretrain_steps)
    num_classes = len(dataset_classes("synthetic"))
    source = build_dataset(DataSpec("synthetic", domain="source", num_images=args.source_images, seed=TRAIN_SEED))
    targets = [
        Target(
            style,
            build_dataset(DataSpec("synthetic", domain=style, num_images=args.adapt_images, seed=ADAPT_SEED)),
            build_dataset(DataSpec("synthetic", domain=style, num_images=args.eval_images, seed=EVAL_SEED)),
        )
        for style in args.targets.split(",")
    ]
    run_all(args, str(ckpt), num_classes, targets, source)


if __name__ == "__main__":
    main()
