"""Which label-free guard rule keeps every CamVid site at or above source-only on its own domain.

For every protocol run (seed, fold) of each config, every site's cached update (the protocol's
``--cache-dir``; nothing is adapted here: a site not cached yet is skipped and named) is taken
apart into what the site could send: the source model as it is, the start under the site's exact
statistics (AdaBN, a = 0), the points θ₀ + a(θ - θ₀) for a = 1/4, 1/2, 3/4 and the adapted model
(a = 1), each under its exact statistics, as ``clients.guard`` builds them. Each gets its mIoU on
the site's own evaluation window and every label-free score on the site's own images
(``clients.guard``'s score images; ``agreement`` is with the start). Then every rule is played on
every site: which point it sends, and that point's mIoU against source-only and the adapted model.

    .venv/bin/python benchmarks/guard_camvid.py --configs camvid-c camvid-daydusk \
        --cache-dir runs/camvid-cache --threads 1

About 4 minutes per site at one thread on a busy 2-core machine; the measurements are kept in
``--out-json`` and read back, so a second call only plays the rules.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clients.guard import INTERPOLATION_POINTS, _as_shipped, _scores, interpolated
from common.data import build_dataset
from common.scoring.scores import SCORES
from experiments.config import ExperimentConfig
from experiments.pool import ModelPool, load_source
from experiments.protocol import ProtocolRun, _sequence_lengths, fold_config
from experiments.shipped import resolve_config_path
from experiments.tasks import TaskPool

OUT = Path(__file__).resolve().parent / "results" / "guard_camvid.md"
POINTS = (0.0, *INTERPOLATION_POINTS, 1.0)
log = logging.getLogger("guard_camvid")
Site = dict[str, Any]  # "source": {"miou", scores...}, "0.0" ... "1.0": the same


def measure_site(config: ExperimentConfig, pool: ModelPool, site_name: str) -> Site | None:
    """Every candidate point of one site: its own-domain mIoU and its label-free scores."""
    site = config.site(site_name)
    if not (pool.folder / f"{pool.key(str(site.data))}.json").is_file():
        return None
    data = build_dataset(site.data)
    adapted = pool.get(site.name, data, str(site.data)).update.state_dict()
    own = next(e for e in config.eval_sets if e.site == site.name)
    tasks, batch, source = TaskPool((own,), config.eval_batch_size), config.method.batch_size, pool.source
    start = _as_shipped(source.model(), source.state, data, batch, "batch")
    params = {k: adapted[k] for k, _ in source.model().named_parameters()}
    models = {"source": source.model()}
    for alpha in POINTS:
        models[str(alpha)] = (source.model(adapted) if alpha == 1.0 else
                              _as_shipped(source.model(), interpolated(source.state, params, alpha), data, batch,
                                          "batch"))  # fmt: skip
    out: Site = {}
    for label, model in models.items():
        miou = tasks.score(source, model.state_dict()).per_domain[own.domain]
        out[label] = {"miou": miou, **_scores(model, start, data, batch, config.seed)}
    return out


def measure(configs: list[str], cache_dir: Path, store: Path, data_root: str | None) -> dict[str, Site]:
    """Every cached site of every protocol run, measured once (``store`` keeps them between calls)."""
    measured: dict[str, Site] = json.loads(store.read_text()) if store.is_file() else {}
    for name in configs:
        config = ExperimentConfig.load(resolve_config_path(name), data_root)
        protocol, lengths = config.protocol, _sequence_lengths()
        assert protocol is not None, f"{name} has no [protocol] table"
        source = load_source(config.source, cache_dir)
        for seed in protocol.seeds:
            for fold in range(protocol.folds) if protocol.folds else [None]:
                run = fold_config(config, protocol, ProtocolRun(seed, fold), lengths)
                pool = ModelPool(source, run.method, run.seed, cache_dir).unguarded()  # the guard is played here
                for site in run.sites:
                    key, cache_key = f"{run.name}:{site.name}", pool.key(str(site.data))
                    same = next((m for m in measured.values() if m.get("cache_key") == cache_key), None)
                    if key in measured or same is not None:  # measured, here or as another config's same site
                        measured[key] = {**(measured.get(key) or same or {}), "cache_key": cache_key}
                        continue
                    started = time.perf_counter()
                    result = measure_site(run, pool, site.name)
                    if result is None:
                        log.warning("%s: not cached yet, skipped", key)
                        continue
                    measured[key] = {**result, "cache_key": cache_key}
                    store.write_text(json.dumps(measured, indent=1))
                    log.info("%s measured in %.0f s", key, time.perf_counter() - started)
    return measured


Rule = Callable[[Site], str]


def fallback(score: str, margin: float) -> Rule:
    """``clients.guard``'s fallback rule: the adapted model unless the score fell below the start's by the margin."""
    return lambda s: "1.0" if s["1.0"][score] >= s["0.0"][score] - margin else "0.0"


def interpolate(score: str, margin: float, max_change: float = 1.0) -> Rule:
    """``clients.guard``'s interpolate rule: the best point within the change limit, if it leads the adapted model."""

    def rule(s: Site) -> str:
        within = [str(a) for a in POINTS[:-1] if a == 0.0 or s[str(a)]["agreement"] >= 1.0 - max_change]
        best = max(within, key=lambda a: s[a][score])  # the first of equals
        adapted_ok = s["1.0"]["agreement"] >= 1.0 - max_change
        return best if not adapted_ok or s[best][score] > s["1.0"][score] + margin else "1.0"

    return rule


def rules() -> dict[str, Rule]:
    out: dict[str, Rule] = {"no guard": lambda s: "1.0", "always the start (AdaBN)": lambda s: "0.0",
                            "always a = 1/2": lambda s: "0.5",
                            "fallback, agreement, 0.2 (the default)": fallback("agreement", 0.2)}  # fmt: skip
    for score in SCORES:
        if score != "agreement":
            out[f"fallback, {score}, 0"] = fallback(score, 0.0)
        out[f"interpolate, {score}, 0"] = interpolate(score, 0.0)
    out["interpolate, photometric, 0, max-change 0.3 (the CamVid configs)"] = interpolate("photometric", 0.0, 0.3)
    return out


def rule_table(measured: dict[str, Site]) -> str:
    """Per rule: sites at or above source-only, the worst and mean difference, the mean against no guard."""
    lines = ["| rule | sites >= source-only | worst sent - source-only | mean sent - source-only | "
             "mean sent - adapted | points sent (a) |", "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    unique = list({s["cache_key"]: s for s in measured.values()}.values())  # a site two configs share counts once
    for name, rule in rules().items():
        sent = [(s, rule(s)) for s in unique]
        over_source = [100 * (s[a]["miou"] - s["source"]["miou"]) for s, a in sent]
        over_adapted = [100 * (s[a]["miou"] - s["1.0"]["miou"]) for s, a in sent]
        points = " ".join(f"{float(a):g}" for _, a in sent)
        cells = [name, f"{sum(d >= 0 for d in over_source)}/{len(sent)}", f"{min(over_source):+.1f}",
                 f"{sum(over_source) / len(sent):+.2f}", f"{sum(over_adapted) / len(sent):+.2f}", points]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_table(measured: dict[str, Site]) -> str:
    """Every site's own-domain mIoU at every point."""
    head = ["site (config/run:site)", "source-only", *[f"a = {a:g}" for a in POINTS]]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, s in measured.items():
        lines.append(f"| {key} | " + " | ".join(f"{100 * s[k]['miou']:.1f}" for k in ["source", *map(str, POINTS)])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["camvid-c", "camvid-daydusk"])
    parser.add_argument("--cache-dir", type=Path, required=True, help="the protocols' --cache-dir (sites cached)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out-json", type=Path, default=Path("runs/guard_camvid.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    measured = measure(args.configs, args.cache_dir.resolve(), args.out_json, args.data_root)
    text = (f"# The site guard on CamVid: {len({s['cache_key'] for s in measured.values()})} sites\n\n"
            f"Command: `.venv/bin/python benchmarks/guard_camvid.py --configs {' '.join(args.configs)} "
            f"--cache-dir {args.cache_dir} --threads {args.threads}`\n\n"
            "Each site's own-domain mIoU (its evaluation window) at every point it could send: source-only, the start "
            "under its exact statistics (a = 0), the interpolated points and the adapted model (a = 1).\n\n"
            + site_table(measured) + "\n\nEvery rule played on every site (margin 0 unless named):\n\n"
            + rule_table(measured) + "\n")  # fmt: skip
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
