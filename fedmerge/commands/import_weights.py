"""``fedmerge import-weights``: a published weights file as a fedmerge start, with a named-key report."""

from __future__ import annotations

import argparse

from fedmerge.cli import CommandError

LAYOUT_HELP = (
    "mit: an ImageNet MiT encoder file (SegFormer's release: patch_embed1.proj.weight, block1.0.attn.q.weight ...); "
    "resnet: a torchvision ImageNet ResNet file; "
    "daformer: a DAFormer/HRDA mmsegmentation checkpoint (state_dict with model., ema_model., imnet_model.)"
)


def run(args: argparse.Namespace) -> int:
    from common.models.weight_import import import_weights, write_imported

    if not args.out.endswith(".safetensors"):
        raise CommandError(f"--out must end in .safetensors, got {args.out!r}")
    classes = [c for c in args.classes.split(",") if c] if args.classes else None
    if classes and args.num_classes and len(classes) != args.num_classes:
        raise CommandError(f"--classes names {len(classes)} classes, --num-classes says {args.num_classes}")
    num_classes = args.num_classes or (len(classes) if classes else 0)
    model, report = import_weights(args.source, args.layout, args.arch, num_classes, args.branch, args.seed)
    path = write_imported(model, report, args.source, args.out, args.arch, classes)
    for line in report.lines():
        print(line)
    print(f"wrote {path} ({args.arch}, {model.final_layer().out_channels} classes)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-weights", help="turn a published weights file into a fedmerge starting checkpoint")
    p.add_argument("layout", choices=["mit", "resnet", "daformer"], help=LAYOUT_HELP)
    p.add_argument("source", help="the published file (.pth, .pt or .safetensors)")
    p.add_argument("--arch", required=True, help="e.g. segformer_b5, daformer_b5, hrda_daformer_b5")
    p.add_argument("--num-classes", type=int, default=0,
                   help="outputs of the head (encoder files: needed unless --classes; daformer: its own)")  # fmt: skip
    p.add_argument("--classes", default="", help="comma-separated class names for the checkpoint's metadata")
    p.add_argument("--branch", default="ema_model", choices=["ema_model", "model"],
                   help="daformer: which network of the UDA checkpoint to take: ema_model (the EMA teacher, default) "
                        "or model (the student, which DAFormer's and HRDA's own test code evaluates)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the parts the file does not fill (a new head)")
    p.add_argument("--out", required=True, help="the starting checkpoint (.safetensors)")
    p.set_defaults(func=run)
