"""Which label-free score falls when a site's adaptation harms it: the site guard on synthetic-4's sites.

synthetic-4's source model (its [source.pretrain] plan, cached) adapts at each of its sites by
its own recipe (selftrain), by that recipe at 100 times the rate, and by 50 steps of tent at
100 times its rate. For every run the table gives the adapted model's mIoU on the site's evaluation
images against the start's (AdaBN: the start with the site's exact statistics), the change
of every label-free score from the start to the adapted model on the site's own images (as
``clients.guard`` measures them), and what the guard with the declared defaults would do.

    .venv/bin/python benchmarks/guard_synthetic.py --threads 1

About 3 minutes of CPU on one thread.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from clients.adaptation import AdaptContext
from clients.guard import GuardConfig, guard_adaptation
from clients.site import SiteJob, adapt_site
from common.data import build_dataset, make_loader
from common.scoring.evaluation import evaluate_domain
from common.scoring.scores import SCORES
from experiments.config import ExperimentConfig, resolve_config_path
from experiments.pool import load_source

OUT = Path(__file__).resolve().parent / "results" / "guard_synthetic.md"


def recipes(config: ExperimentConfig) -> dict[str, tuple[str, dict]]:
    """The config's own recipe, and two that destroy: the same at 100x the rate, tent at 100x its rate."""
    own = dict(config.method.options)
    return {"adabn": ("adabn", {}), config.method.name: (config.method.name, own),
            f"{config.method.name} lr x100": (config.method.name, {**own, "lr": 1e-2}),
            "tent lr x100, 50 steps": ("tent", {"steps": 50, "lr": 1e-1})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic-4")
    parser.add_argument("--cache-dir", default="runs/guard_synthetic", help="the pretrained source model goes here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = ExperimentConfig.load(resolve_config_path(args.config))
    source = load_source(config.source, Path(args.cache_dir))
    guard = GuardConfig.read({"guard": True})
    names = list(SCORES)
    rows = [f"| site | recipe | mIoU start → adapted | {' | '.join(f'Δ {n}' for n in names)} | default guard |",
            "|---|---|---|" + "---|" * len(names) + "---|"]  # fmt: skip
    for site in config.sites:
        target = build_dataset(site.data)
        evaluation = make_loader(build_dataset(next(e.data for e in config.eval_sets if e.site == site.name)), 16)
        start_miou = None
        for label, (method, options) in recipes(config).items():
            torch.manual_seed(config.seed)
            model = source.model()
            context = AdaptContext(progress=False, seed=config.seed)
            adapt_site(model, target, SiteJob(site.name, method, options, config.method.batch_size, context=context))
            miou = 100 * evaluate_domain(model, evaluation, source.num_classes).miou
            start_miou = miou if start_miou is None else start_miou  # the first recipe is adabn: the start
            decision = guard_adaptation(copy.deepcopy(model), source.state, target, guard,
                                        batch_size=config.method.batch_size, seed=config.seed)  # fmt: skip
            deltas = [f"{decision.adapted.get(n, float('nan')) - decision.start[n]:+.3f}" for n in names]
            verdict = "falls back" if decision.fell_back else "keeps"
            rows.append(f"| {site.name} | {label} | {start_miou:.1f} → {miou:.1f} | {' | '.join(deltas)} | {verdict} |")
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - started
    header = [
        f"# The site guard on {config.name}\n",
        f"Produced by `.venv/bin/python benchmarks/guard_synthetic.py --threads {args.threads}` in {seconds:.0f} s.",
        f"Default guard: `guard-score = {','.join(guard.scores)!r}`, `guard-margin = {guard.margin}`.",
        "Δ: adapted minus start, on at most 16 of the site's own unlabeled images; mIoU on its evaluation images.\n",
    ]
    OUT.write_text("\n".join(header + rows) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
