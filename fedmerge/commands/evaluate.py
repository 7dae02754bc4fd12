"""``fedmerge evaluate``: per-domain mIoU and the harmonic mean H of checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.data.spec import DataSpec
from experiments.tables import markdown_table
from fedmerge.cli import CommandError, add_device_options, device_options


def _specs(items: list[str]) -> dict[str, DataSpec]:
    specs = {}
    for item in items:
        spec = DataSpec.parse(item)
        name = spec.domain or spec.kind
        if name in specs:
            raise CommandError(f"two --data sets share the domain name {name!r}")
        specs[name] = spec
    return specs


def evaluate(args: argparse.Namespace) -> int:
    from common.data import build_dataset, make_loader
    from common.models.checkpoints import load_checkpoint
    from common.scoring.evaluation import evaluate_domains

    specs = _specs(args.data)
    compute = device_options(args)
    loaders = {d: make_loader(build_dataset(s), args.batch_size) for d, s in specs.items()}
    results: dict[str, dict] = {}
    for ckpt in args.checkpoints:
        model, meta = load_checkpoint(ckpt)
        model.to(compute.device)
        scores, h = evaluate_domains(model, loaders, int(meta["num_classes"]), progress=True, amp=compute.amp)
        results[ckpt] = {
            "per_domain": {d: s.miou for d, s in scores.items()},
            "per_class": {d: s.per_class for d, s in scores.items()},
            "num_images": {d: s.num_images for d, s in scores.items()},
            "harmonic_mean": h,
        }
    rows = [
        [Path(c).name, *[100 * r["per_domain"][d] for d in specs], 100 * r["harmonic_mean"]] for c, r in results.items()
    ]
    print(markdown_table(["checkpoint (mIoU %)", *specs, "H"], rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"data": {d: str(s) for d, s in specs.items()}, "results": results}, indent=2)
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-domain mIoU and H of one or more checkpoints")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument(
        "--data", action="append", required=True, metavar="SPEC",
        help="a labeled set per domain, e.g. camvid:../shared/data/camvid?split=test&domain=Seq05VD",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write the results as JSON here")
    add_device_options(p)
    p.set_defaults(func=evaluate)
