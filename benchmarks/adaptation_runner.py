"""Shared by the adaptation benchmarks: run one method on one target and score it.

Each run starts from the same source checkpoint, goes through ``clients.site.adapt_site``
(the method, then the exact BN statistics pass, exactly as a site does), and is scored
on held-out labeled frames that the method never sees. Label-free signals (mean entropy,
confident fraction) are reported beside the score: they are what a site can see.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from clients.adaptation import AdaptContext
from clients.site import SiteJob, adapt_site
from common.data import make_loader
from common.models.factory import build_model
from common.scoring.evaluation import evaluate_domain

__all__ = [
    "Run",
    "Target",
    "add_common_arguments",
    "describe",
    "parse_overrides",
    "run_all",
    "run_method",
    "save_runs",
    "score",
    "table",
]


@dataclass
class Target:
    name: str
    adapt: Dataset  # unlabeled for the method: it only ever reads the images
    evaluate: Dataset  # held out in time, never seen by a method


@dataclass
class Run:
    target: str
    method: str
    options: dict[str, str]
    miou: float
    per_class: list[float]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def score(model: torch.nn.Module, data: Dataset, num_classes: int) -> tuple[float, list[float]]:
    result = evaluate_domain(model, make_loader(data, 8), num_classes)
    return 100 * result.miou, [100 * v for v in result.per_class]


def run_method(
    method: str,
    options: Mapping[str, str],
    checkpoint: str,
    num_classes: int,
    target: Target,
    source: Dataset | None,
    seed: int = 0,
    progress: bool = True,
) -> Run:
    """``method`` (``source-only`` = no adaptation at all) from ``checkpoint`` on ``target``."""
    arch = "hrda_small_unet" if method == "hrda" and options.get("multires", "true") != "false" else "small_unet"
    options = {k: v for k, v in options.items() if k != "multires"}
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, weights=checkpoint)
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    if method != "source-only":
        context = AdaptContext(source=source, progress=progress, seed=seed)
        update = adapt_site(model, target.adapt, SiteJob(target.name, method, dict(options), 8, context=context))
        metrics = update.metrics
    seconds = time.perf_counter() - started
    miou, per_class = score(model, target.evaluate, num_classes)
    return Run(target.name, method + ("" if arch == "small_unet" else " (hrda_small_unet)"), dict(options), miou,
               per_class, seconds, metrics)  # fmt: skip


def describe(run: Run) -> str:
    """One log line: the score beside the label-free signals a site could have seen."""
    signals = {k: round(v, 3) for k, v in run.metrics.items() if k in ("mean-entropy", "confident-fraction")}
    return f"{run.method:28s} {run.target:10s} mIoU {run.miou:5.1f}  {run.seconds:6.0f} s  {signals}"


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``method:key=value`` items to {method: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq:
            raise ValueError(f"--set expects method:key=value, got {item!r}")
        out.setdefault(method, {})[key] = value
    return out


def table(runs: list[Run], targets: list[str]) -> str:
    """mIoU per target, then the wall time of each method per target."""
    methods = list(dict.fromkeys(r.method for r in runs))
    by = {(r.method, r.target): r for r in runs}
    head = ["method", *[f"{t} mIoU" for t in targets], *[f"{t} time (s)" for t in targets]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in methods:
        cells = [f"{by[(m, t)].miou:.1f}" if (m, t) in by else "-" for t in targets]
        cells += [f"{by[(m, t)].seconds:.0f}" if (m, t) in by else "-" for t in targets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_runs(path: str | Path, runs: list[Run], header: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"header": header, "runs": [asdict(r) for r in runs]}, indent=1))


def add_common_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...], json_default: str) -> None:
    """The options both adaptation benchmarks take."""
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="adaptation seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=json_default, help="every run, written as it ends")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_all(
    args: argparse.Namespace, checkpoint: str, num_classes: int, targets: list[Target], source: Dataset
) -> list[Run]:
    """Every method of ``args.methods`` on every target, logged and saved as each run ends."""
    overrides = parse_overrides(args.set)
    runs = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        for target in targets:
            run = run_method(method, overrides.get(method, {}), checkpoint, num_classes, target,
                             source if method == "hrda" else None, args.seed, not args.quiet)  # fmt: skip
            runs.append(run)
            print(describe(run), flush=True)
            save_runs(args.json, runs, vars(args))
    print(f"\n{len(runs)} runs in {time.perf_counter() - started:.0f} s; threads {args.threads}\n")
    print(table(runs, [t.name for t in targets]))
    return runs
