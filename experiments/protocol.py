"""Repeated comparisons over seeds and time folds: means, spreads and paired differences.

With 20 or 30 evaluation frames and one seed, which merge wins on CamVid flipped between
splits. The protocol runs the same comparison on several folds of each target sequence
(adapt on its first frames, skip a gap, score the next window; the folds' windows tile
the end of the sequence) and several seeds, then reports each strategy's mean and spread
and, run by run, its difference to the best single site. Every finished run is written
to its own folder and read back on the next call, so a long protocol can be completed
over several sittings.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.data import DataSpec, TimeSplit, build_dataset
from common.scoring.scores import SCORES
from experiments.config import ExperimentConfig, ProtocolConfig
from experiments.selection import selection_rows
from experiments.tables import markdown_table

__all__ = [
    "ProtocolRun",
    "aggregate",
    "best_single",
    "fold_config",
    "fold_windows",
    "protocol_markdown",
    "run_protocol",
]

log = logging.getLogger(__name__)
RUNS_DIR = "runs"


@dataclass(frozen=True)
class ProtocolRun:
    seed: int
    fold: int | None  # None: the config's own splits (a protocol of seeds only)

    @property
    def name(self) -> str:
        return f"seed{self.seed}" if self.fold is None else f"seed{self.seed}-fold{self.fold}"


def fold_windows(total: int, protocol: ProtocolConfig, fold: int) -> tuple[TimeSplit, TimeSplit]:
    """(adaptation frames, evaluation window) of ``fold`` in a sequence of ``total`` frames.

    The evaluation windows, each ``eval_fraction`` of the sequence, tile its end: the last
    fold scores the last frames. Each fold adapts on every frame before its window but the
    ``gap`` frames just before it, so no evaluated frame is a near-duplicate of an adapted one.
    """
    size = max(1, round(total * protocol.eval_fraction))
    end = total - (protocol.folds - 1 - fold) * size
    start = end - size
    adapt = start - protocol.gap
    if adapt < 1:
        raise ValueError(
            f"{protocol.folds} folds of {size} frames with a gap of {protocol.gap} leave fold {fold} "
            f"of a {total}-frame sequence nothing to adapt on"
        )
    return TimeSplit("first", count=adapt), TimeSplit("frames", count=size, start=start)


def _sequence_lengths() -> Callable[[DataSpec], int]:
    """A data spec's whole sequence length, read once per sequence."""
    cache: dict[str, int] = {}

    def length(spec: DataSpec) -> int:
        key = str(spec.with_(time_split=None))
        if key not in cache:
            cache[key] = len(build_dataset(spec.with_(time_split=None)))
        return cache[key]

    return length


def fold_config(
    config: ExperimentConfig, protocol: ProtocolConfig, run: ProtocolRun, lengths: Callable[[DataSpec], int]
) -> ExperimentConfig:
    """``config`` with every site adapting on its fold's frames and every evaluation set scoring its window."""
    if run.fold is None:
        return replace(config, name=f"{config.name}/{run.name}", seed=run.seed)
    windows = {}
    for site in config.sites:
        windows[site.name] = fold_windows(lengths(site.data), protocol, run.fold)
    sites = tuple(replace(s, data=s.data.with_(time_split=windows[s.name][0])) for s in config.sites)
    evals = []
    for e in config.eval_sets:
        window = windows[e.site][1] if e.site in windows else fold_windows(lengths(e.data), protocol, run.fold)[1]
        evals.append(replace(e, data=e.data.with_(time_split=window)))
    return replace(config, name=f"{config.name}/{run.name}", sites=sites, eval_sets=tuple(evals), seed=run.seed)


def run_protocol(
    config: ExperimentConfig,
    out_dir: Path,
    cache_dir: Path,
    run_one: Callable[[ExperimentConfig, Path, Path], dict[str, Any]],
    lengths: Callable[[DataSpec], int] | None = None,
    missing: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every (seed, fold) run's results, computing only those not already in ``out_dir/runs``.

    ``run_one(config, run_dir, cache_dir)`` runs one comparison and returns its results dict
    (it writes the run's files); finished runs are read back from their ``results.json``.
    ``lengths`` gives a data spec's whole sequence length (default: read the data set).
    With a ``missing`` list, nothing is computed: the names of unfinished runs are appended to
    it instead, so a protocol spread over several sittings can be reported as it stands.
    """
    protocol = config.protocol
    if protocol is None:
        raise ValueError(f"experiment {config.name!r} has no [protocol] table")
    lengths = lengths or _sequence_lengths()

    results = []
    folds: list[int | None] = list(range(protocol.folds)) if protocol.folds else [None]
    for seed in protocol.seeds:
        for fold in folds:
            run = ProtocolRun(seed, fold)
            run_dir = out_dir / RUNS_DIR / run.name
            done = run_dir / "results.json"
            if done.is_file():
                log.info("protocol run %s: reading the finished run back", run.name)
                results.append(json.loads(done.read_text()))
                continue
            if missing is not None:
                missing.append(run.name)
                continue
            log.info("protocol run %s", run.name)
            results.append(run_one(fold_config(config, protocol, run, lengths), run_dir, cache_dir))
    return results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def best_single(run: dict[str, Any]) -> float:
    """The best site's H as the site sends it: ``single:<site>`` rows only, not a labelled variant (``+image``)."""
    rows = run["strategies"]
    singles = [r["harmonic_mean"] for r in rows if r["name"] == "single" and r["label"].startswith("single:")]
    return max(singles) if singles else float("nan")


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy label: mean and spread of H and of each domain, and the paired difference to the best site."""
    labels = [r["label"] for r in runs[0]["strategies"]]
    domains = [e["domain"] for e in runs[0]["eval_sets"]]
    out = []
    for label in labels:
        rows = [next(r for r in run["strategies"] if r["label"] == label) for run in runs]
        diffs = [row["harmonic_mean"] - best_single(run) for row, run in zip(rows, runs, strict=True)]
        h = _mean_sd([row["harmonic_mean"] for row in rows])
        out.append(
            {
                "label": label,
                "name": rows[0]["name"],
                "test_time_domain": rows[0]["test_time_domain"],
                "runs": len(rows),
                "harmonic_mean": h,
                "per_domain": {d: _mean_sd([row["per_domain"].get(d) for row in rows]) for d in domains},
                "vs_best_single": _mean_sd(diffs),
                "positive_runs": sum(d > 0 for d in diffs),
                "paired": diffs,
            }
        )
    return out


def _pct(pair: tuple[float, float]) -> str:
    mean, sd = pair
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def protocol_markdown(
    config: ExperimentConfig, runs: list[dict[str, Any]], command: str = "", missing: list[str] | None = None
) -> str:
    protocol = config.protocol
    assert protocol is not None
    if not runs:
        raise ValueError(f"no finished protocol run to report; still to run: {', '.join(missing or [])}")
    rows = aggregate(runs)
    domains = [e["domain"] for e in runs[0]["eval_sets"]]
    header = ["strategy (mIoU %, mean ± sd)", "domain at test", *domains, "H", "H - best single site",
              "runs where it wins"]  # fmt: skip
    table = [
        [r["label"], "needed" if r["test_time_domain"] else "-", *[_pct(r["per_domain"][d]) for d in domains],
         _pct(r["harmonic_mean"]), _pct(r["vs_best_single"]), f"{r['positive_runs']}/{r['runs']}"]
        for r in rows
    ]  # fmt: skip
    runs_lines = [
        f"- {run['experiment']}: "
        + ", ".join(f"{e['domain']} adapts on `{_time(s['data'])}`, scored on `{_time(e['data'])}` "
                    f"({e['num_images']} frames)" for s, e in _pairs(run))
        for run in runs
    ] if protocol.folds else [f"- {run['experiment']}: seed {run['seed']}" for run in runs]  # fmt: skip
    parts = [
        f"# {config.name}: {len(runs)} runs ({_design(protocol)})",
        f"**Partial: {len(runs)} of {len(runs) + len(missing)} runs; not yet run: {', '.join(missing)}.**"
        if missing
        else "",
        config.description,
        f"Command: `{command}`" if command else "",
        _how_runs_differ(protocol) + " 'H - best single site' is paired: run by run, the strategy's H minus "
        "the best single site's H in that same run.",
        markdown_table(header, table),
        *selection_section(runs),
        "## Runs",
        "\n".join(runs_lines),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def selection_section(runs: list[dict[str, Any]]) -> list[str]:
    """How each label-free score would have chosen among the one-shot merges, run by run, summarised."""
    per_run = [selection_rows(run["strategies"]) for run in runs]
    if not any(per_run):
        return []
    table = []
    for name in SCORES:
        rows = [r for rows in per_run for r in rows if r["score"] == name]
        if not rows:
            continue
        rho = _mean_sd([r["spearman"] for r in rows])
        gap = _mean_sd([r["pick_h"] - r["best_h"] for r in rows])
        over_default = _mean_sd([r["pick_h"] - r["default_h"] for r in rows])
        near = sum(r["best_h"] - r["pick_h"] <= 0.01 for r in rows)
        table.append([name, f"{rho[0]:.2f} ± {rho[1]:.2f}", _pct(over_default), _pct(gap), f"{near}/{len(rows)}"])
    header = ["score", "Spearman rho with H", "pick - default merge (H %)", "pick - best in hindsight (H %)",
              "runs within 1 H of the best"]  # fmt: skip
    return [
        "## Choosing the merge without labels",
        "Each site scores every one-shot merge on its own images; a score picks the merge with the highest "
        "worst-site value. Per run, against the true H of those merges:",
        markdown_table(header, table),
    ]


def _design(protocol: ProtocolConfig) -> str:
    seeds = f"seeds {list(protocol.seeds)}"
    return f"{protocol.folds} time folds x {seeds}" if protocol.folds else f"{seeds}, the config's own splits"


def _how_runs_differ(protocol: ProtocolConfig) -> str:
    if not protocol.folds:
        return "Every run adapts and scores on the config's own sets; only the seed changes."
    return (
        f"Each fold adapts on the first frames of every target sequence, skips {protocol.gap} frames, and "
        f"scores the next window ({protocol.eval_fraction:.0%} of the sequence); the windows tile the end of "
        "each sequence."
    )


def _time(spec_text: str) -> str:
    return next((part[5:] for part in spec_text.split("&") if part.startswith("time=")), "all")


def _pairs(run: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    sites = {s["name"]: s for s in run["sites"]}
    return [(sites[e["site"]], e) for e in run["eval_sets"] if e["site"] in sites]
