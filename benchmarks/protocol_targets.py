"""The CamVid targets of a finished protocol, run by run: what the protocol's table averages away.

Reads every ``runs/*/results.json`` of one or more ``fedmerge compare`` protocol folders and prints, for
the rows named, mean ± sd over the runs of H minus the best single site, source-only and data-combination
(paired run by run) with the runs it wins, and for every site its own domain's mIoU minus source-only's
in each run. With several folders (e.g. the same protocol with the site guard on) each gets its tables.

    .venv/bin/python benchmarks/protocol_targets.py runs/protocol_camvid_c runs/protocol_camvid_c_guard \
        --rows merge "merge(w=0)"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from experiments.protocol import best_single

REFERENCES = ("best single site", "source-only", "data-combination")


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """Every finished run of a protocol folder, in name order."""
    paths = sorted((folder / "runs").glob("*/results.json"))
    if not paths:
        raise SystemExit(f"{folder}: no finished protocol run (runs/*/results.json)")
    return [json.loads(p.read_text()) for p in paths]


def _row(run: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in run["strategies"] if r["label"] == label), None)


def reference_h(run: dict[str, Any], reference: str) -> float | None:
    """H of the reference row in ``run``: the best single site, or a row by its label."""
    if reference == "best single site":
        return best_single(run)
    row = _row(run, reference)
    return None if row is None else row["harmonic_mean"]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):+.1f} ± {100 * sd:.1f}"


def target_table(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """Per row: H, and H minus each reference, paired run by run, with the runs where it is above."""
    head = ["row", "runs", "H", *[f"H - {r} (runs above)" for r in REFERENCES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        rows = [(run, _row(run, label)) for run in runs]
        present = [(run, row) for run, row in rows if row is not None]
        h = [row["harmonic_mean"] for _, row in present]
        cells = [label, str(len(present)), _mean_sd(h).lstrip("+")]
        for reference in REFERENCES:
            diffs = [
                row["harmonic_mean"] - ref for run, row in present if (ref := reference_h(run, reference)) is not None
            ]
            cells.append(f"{_mean_sd(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_table(runs: list[dict[str, Any]]) -> str:
    """Every site's own domain: its model's mIoU minus source-only's, run by run, and the runs at or above."""
    lines = ["| site (own domain) | single minus source-only, per run (mIoU points) | runs >= source-only |",
             "|---|---|---|"]  # fmt: skip
    sites = [e["site"] for e in runs[0]["eval_sets"] if e["site"]]
    for site in sites:
        domain = next(e["domain"] for e in runs[0]["eval_sets"] if e["site"] == site)
        diffs = []
        for run in runs:
            own, start = _row(run, f"single:{site}"), _row(run, "source-only")
            if own is not None and start is not None:
                diffs.append(own["per_domain"][domain] - start["per_domain"][domain])
        shown = ", ".join(f"{100 * d:+.1f}" for d in diffs)
        lines.append(f"| {site} ({domain}) | {shown} | {sum(d >= 0 for d in diffs)}/{len(diffs)} |")
    return "\n".join(lines)


def guard_lines(runs: list[dict[str, Any]]) -> list[str]:
    """What each site's guard decided, when the runs were guarded."""
    out = []
    for run in runs:
        decided = [(s["name"], s["metrics"]) for s in run["sites"] if "guard-fell-back" in s["metrics"]]
        if decided:
            shown = ", ".join(f"{name} a={m.get('guard-alpha', 0.0 if m['guard-fell-back'] else 1.0):g}"
                              for name, m in decided)  # fmt: skip
            out.append(f"- {run['experiment']}: {shown}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="protocol output folders (fedmerge compare --out-dir)")
    parser.add_argument("--rows", nargs="+", default=["merge"], help="row labels to hold against the references")
    args = parser.parse_args()
    for folder in args.folders:
        runs = load_runs(folder)
        print(f"## {folder} ({len(runs)} runs: {', '.join(r['experiment'].rpartition('/')[2] for r in runs)})\n")
        print(target_table(runs, args.rows) + "\n")
        print(site_table(runs) + "\n")
        decisions = guard_lines(runs)
        if decisions:
            print("Guard (a: the point sent, 0 the start, 1 the adapted model):\n" + "\n".join(decisions) + "\n")


if __name__ == "__main__":
    main()
