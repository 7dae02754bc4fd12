"""``fedmerge adapt``: one site's local adaptation, from a checkpoint to a site-update file.

The same code path as the Flower ClientApp (``clients.site.adapt_site``): the method runs,
then the exact BN statistics pass, then the update is written with its sample counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from common.models.catalog import ARCHITECTURES
from fedmerge.cli import CommandError, add_device_options, device_options

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _options(items: list[str]) -> dict[str, str]:
    from common.options.typed import parse_key_values

    return parse_key_values(" ".join(items), "--set")


def _guard_values(args: argparse.Namespace) -> dict[str, object]:
    """The run-config guard keys the command line set (the others keep their declared defaults)."""
    given = {"guard": args.guard or None, "guard-score": args.guard_score, "guard-margin": args.guard_margin,
             "guard-rule": args.guard_rule, "guard-max-change": args.guard_max_change}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def describe_methods() -> str:
    """Every registered method with its summary and its config fields, typed, with defaults."""
    from clients.adaptation import METHODS

    lines = []
    for name in METHODS:
        method = METHODS.get(name)
        needs = " [needs --source]" if method.options.needs_source else ""
        lines.append(f"{name}{needs}: {method.summary}")
        for f in dataclasses.fields(method.options):
            type_name = f.type if isinstance(f.type, str) else f.type.__name__
            lines.append(f"    {f.name.replace('_', '-')}: {type_name} = {f.default!r}")
    return "\n".join(lines)


def _load_model(path: str, arch: str | None, classes: list[str]) -> tuple[torch.nn.Module, str]:
    from common.models.checkpoints import load_checkpoint, read_model_file
    from common.models.factory import build_model

    if arch is None:
        model, meta = load_checkpoint(path, classes, with_bank=False)
        return model, meta["arch"]
    file = read_model_file(path)
    if file.num_classes and file.num_classes != len(classes):
        raise CommandError(f"{path}: {file.num_classes} classes, the data has {len(classes)}")
    return build_model(arch, len(classes), weights=path), arch


def run(args: argparse.Namespace) -> int:
    from clients.adaptation import METHODS

    if args.list:
        print(describe_methods())
        return 0
    missing = [flag for flag, value in (("--method", args.method), ("--model", args.model), ("--data", args.data),
                                        ("--out", args.out)) if not value]  # fmt: skip
    if missing:
        raise CommandError(f"{', '.join(missing)} required (or --list)")
    options = _options(args.set)
    config = METHODS.get(args.method).make_options(options)  # a bad option fails before torch or any data

    import torch

    from clients.adaptation import AdaptContext
    from clients.guard import GuardConfig
    from clients.site import SiteJob, adapt_site
    from common.data import DataSpec, build_dataset, dataset_classes, make_loader
    from common.scoring.evaluation import evaluate_domain
    from common.updates.files import save_site_update

    guard = GuardConfig.read(_guard_values(args))  # a bad score fails before the model or any data is loaded
    compute = device_options(args)  # so does a device this machine lacks
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = DataSpec.parse(args.data)
    classes = dataset_classes(spec.kind, spec.root)
    model, arch = _load_model(args.model, args.arch, classes)
    source = None
    if args.source:
        source = build_dataset(DataSpec.parse(args.source))
    elif config.needs_source:
        raise CommandError(f"method {args.method!r} needs the labeled source set: give --source SPEC")
    target = build_dataset(spec)
    context = AdaptContext(
        source=source,
        checkpoint_dir=args.checkpoint_dir or "",
        progress=not args.quiet,
        seed=args.seed,
        backbone_weights=args.backbone_weights or "",
        compute=compute,
    )
    domain = args.domain or spec.domain or spec.kind
    job = SiteJob(domain, args.method, options, args.batch_size, context=context, guard=guard)
    started = time.perf_counter()
    update = adapt_site(model, target, job)
    save_site_update(args.out, update, arch, len(classes))
    seconds = time.perf_counter() - started
    where = f"{len(target)} images, {arch}, {compute.device}"
    print(f"{args.method} on {domain} ({where}) in {seconds:.0f} s -> {args.out}")
    for key, value in sorted(update.metrics.items()):
        print(f"  {key}: {value:.4g}")
    for text in args.eval:
        eval_spec = DataSpec.parse(text)
        loader = make_loader(build_dataset(eval_spec), args.batch_size)
        score = evaluate_domain(model, loader, len(classes), amp=compute.amp)  # on the device adapt_site left it on
        print(f"  mIoU on {eval_spec}: {100 * score.miou:.2f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from common.config.run import declared_defaults

    p = sub.add_parser("adapt", help="adapt a model on one site's unlabeled images and write its site update")
    p.add_argument("--list", action="store_true", help="list the methods, their options and defaults, and exit")
    p.add_argument("--method", help="adaptation method (see --list)")
    p.add_argument("--model", metavar="CKPT", help="the shared starting checkpoint")
    p.add_argument(
        "--arch",
        help=f"rebuild the checkpoint as this arch ({', '.join(ARCHITECTURES)}; hrda_<arch> wraps a plain model)",
    )
    p.add_argument("--data", metavar="SPEC", help="the site's target images, e.g. camvid:DIR?domain=0001TP")
    p.add_argument("--source", metavar="SPEC", help="the labeled source set (methods that need it: hrda)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option; repeatable")
    p.add_argument("--out", metavar="FILE", help="the site update (.safetensors)")
    p.add_argument("--domain", help="site name recorded in the update (default: the data's domain)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch of the BN statistics pass")
    p.add_argument("--checkpoint-dir", help="keep resumable training state here; a rerun resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone-weights", help="ImageNet backbone weights (HRDA's feature distance)")
    p.add_argument("--guard", action="store_true", help="send the start (with AdaBN) if adapting lowers its score")
    p.add_argument("--guard-score", help=f"the guard's label-free score (default {declared_defaults()['guard-score']})")
    p.add_argument("--guard-margin", type=float, help="how far below the start's score the adapted model may go")
    p.add_argument("--guard-rule", help="fallback (the adapted model or the start) or interpolate (the best point "
                   "between them by the first guard score)")  # fmt: skip
    p.add_argument("--guard-max-change", type=float, help="the largest share of the start's labels a sent model may "
                   "change (1: no limit)")  # fmt: skip
    p.add_argument("--eval", action="append", default=[], metavar="SPEC", help="score the adapted model here")
    add_device_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
