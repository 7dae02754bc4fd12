"""The synthetic domain gap: source-only vs AdaBN mIoU of a small model on every style.

A small_unet is pretrained on the clean "source" style, then scored on held-out images of
each style (a different generation seed than anything used for training or adaptation),
first as is, then after AdaBN: exact BN statistics re-estimated on that style's unlabeled
adaptation images. A real gap is a large source-only drop that AdaBN partly recovers.

    .venv/bin/python benchmarks/synthetic_gap.py --threads 1

About 5 minutes of CPU; on a machine shared with other jobs, one thread is faster than two.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common.bn.stats import exact_bn_statistics
from common.data import SYNTHETIC_STYLES, DataSpec, build_dataset, dataset_classes, image_batches, make_loader
from common.models.factory import build_model
from common.scoring.evaluation import evaluate_domain
from common.training.pretrain import PretrainConfig, train_segmenter

TRAIN_SEED, ADAPT_SEED, EVAL_SEED = 0, 1, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_unet")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=400, help="source images for pretraining")
    parser.add_argument("--adapt-images", type=int, default=48, help="unlabeled target images for AdaBN")
    parser.add_argument("--eval-images", type=int, default=48, help="held-out labeled images per style")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    num_classes = len(dataset_classes("synthetic"))

    source = build_dataset(DataSpec("synthetic", domain="source", num_images=args.train_images, seed=TRAIN_SEED))
    config = PretrainConfig(arch=args.arch, steps=args.steps, batch_size=args.batch_size, progress=False)
    torch.manual_seed(config.seed)  # before build_model: the initial weights are part of the result
    model = build_model(args.arch, num_classes)
    result = train_segmenter(model, source, config)

    rows = []
    for style in SYNTHETIC_STYLES:
        held_out = build_dataset(DataSpec("synthetic", domain=style, num_images=args.eval_images, seed=EVAL_SEED))
        loader = make_loader(held_out, 16)
        plain = evaluate_domain(model, loader, num_classes).miou
        adapted = copy.deepcopy(model)
        unlabeled = build_dataset(DataSpec("synthetic", domain=style, num_images=args.adapt_images, seed=ADAPT_SEED))
        exact_bn_statistics(adapted, image_batches(unlabeled, 16))
        rows.append((style, 100 * plain, 100 * evaluate_domain(adapted, loader, num_classes).miou))

    src = rows[0][1]
    print(f"{args.arch}, {args.steps} steps x batch {args.batch_size} on {args.train_images} source images "
          f"(seed {TRAIN_SEED}); AdaBN on {args.adapt_images} unlabeled images per style (seed {ADAPT_SEED}); "
          f"mIoU on {args.eval_images} held-out images per style (seed {EVAL_SEED}).")  # fmt: skip
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"final training loss {result.losses[-1]:.3f}; wall {wall:.0f} s, CPU {cpu:.0f} s\n")
    print("| style | source-only mIoU | drop vs source | AdaBN mIoU | recovered |")
    print("|---|---:|---:|---:|---:|")
    for style, plain, adabn in rows:
        drop = src - plain
        recovered = f"{100 * (adabn - plain) / drop:.0f}%" if drop > 1 else "-"
        print(f"| {style} | {plain:.1f} | {drop:.1f} | {adabn:.1f} | {recovered} |")


if __name__ == "__main__":
    main()
