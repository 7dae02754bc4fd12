"""``fedmerge pretrain``: train the source model on a labeled set and write a checkpoint."""

from __future__ import annotations

import argparse
import logging

from common.data.spec import DataSpec, parse_size
from common.models.catalog import ARCHITECTURES
from fedmerge.cli import CommandError, add_device_options, device_options

log = logging.getLogger(__name__)


def _pair(text: str, kind: type) -> tuple:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from common.training.pretrain import PretrainPlan, pretrain_to_file

    if not args.out.endswith(".safetensors"):
        raise CommandError(f"--out must end in .safetensors, got {args.out!r}")
    try:
        plan = PretrainPlan(
            DataSpec.parse(args.data), args.arch, args.steps, args.batch_size, args.seed, lr=args.lr,
            weight_decay=args.weight_decay, scale=args.scale, crop=args.crop, flip=not args.no_flip,
            photometric=args.photometric, class_weight_power=args.class_weight_power,
            hard_pixel_fraction=args.hard_pixel_fraction, label_smoothing=args.label_smoothing,
        )  # fmt: skip
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    compute = device_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pretrain_to_file(plan, args.out, progress=not args.quiet, device=compute.device, amp=compute.amp)
    print(f"wrote {path} ({args.arch}, {args.steps} steps on {plan.data})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a source model on a labeled data spec")
    p.add_argument("--data", required=True, metavar="SPEC", help="e.g. synthetic?domain=source&n=400")
    p.add_argument("--arch", default="small_unet", help=f"one of {', '.join(ARCHITECTURES)}, or hrda_<one of them>")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--scale", type=lambda t: _pair(t, float), default=(0.75, 1.5), metavar="LO,HI",
                   help="random rescale range (default 0.75,1.5; 1,1 turns it off)")  # fmt: skip
    p.add_argument("--crop", type=lambda t: parse_size(t), default=None, metavar="HxW",
                   help="training crop (default: the image size)")  # fmt: skip
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--photometric", action="store_true",
                   help="jitter the light of the source frames (brightness, contrast, saturation, gamma)")  # fmt: skip
    p.add_argument("--class-weight-power", type=float, default=0.0, metavar="P",
                   help="class weights frequency**-P (0: plain cross-entropy; 0.5: inverse square root)")  # fmt: skip
    p.add_argument("--hard-pixel-fraction", type=float, default=1.0, metavar="F",
                   help="train on this share of the hardest labeled pixels per batch (1: every pixel)")  # fmt: skip
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.set_defaults(func=run)
