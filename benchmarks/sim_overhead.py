"""What a small federated run costs beyond the sites' own work: a real 3-site Flower simulation.

Runs a simulation preset (default ``tiny``: 3 synthetic sites, tiny_unet, AdaBN) through
``server.simulation.run_simulation`` (SuperLink, ``flwr run``, Ray actors) and splits
its wall time with the report the ServerApp writes:

* the sites' adaptation (``adapt-seconds`` per site) and BN-statistics/metrics pass
  (``bn-seconds``; for AdaBN that pass is the adaptation): work a site does whatever
  the framework. Sites run concurrently (one CPU each, 2 cores), so the work they
  overlap is somewhere between the longest site's and the sum; the overhead is printed
  against both;
* the server's train round (push, wait, validate and merge each reply as it comes),
  the merge finish, and any server-side evaluation (``timings`` in the report);
* the rest: starting the SuperLink and SuperExec, ``flwr run``, Ray and the ClientApp
  processes (torch imports), message transport and teardown.

Server-side evaluation is switched off unless ``--keep-eval``, so the run measures the
merge, not scoring.

    .venv/bin/python benchmarks/sim_overhead.py --repeats 3     # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/sim_overhead.py --keep-eval
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.simulation import SimulationPlan, run_simulation  # noqa: E402

NO_EVAL = {"eval-domains": "", "eval-sites": False}


def one_run(plan: SimulationPlan, keep_eval: bool) -> dict[str, Any]:
    """Run the plan once in a fresh folder; wall time and the report's own numbers."""
    with tempfile.TemporaryDirectory(prefix="sim_overhead_") as tmp:
        start = time.perf_counter()
        report = run_simulation(plan, Path(tmp), plan.resolve(None if keep_eval else NO_EVAL))
        wall = time.perf_counter() - start
    sites = report["sites"]
    adapt = [float(s["metrics"].get("adapt-seconds", 0.0)) for s in sites]
    bn = [float(s["metrics"].get("bn-seconds", 0.0)) for s in sites]
    timings = {k: float(v) for k, v in report.get("timings", {}).items()}
    return {"wall": wall, "sites": len(sites), "adapt": adapt, "bn": bn, "timings": timings}


def breakdown(run: dict[str, Any]) -> list[tuple[str, float]]:
    """Rows of (what, seconds) for one run; a site's own work is its adaptation plus its BN pass."""
    wall, adapt, bn, timings = run["wall"], run["adapt"], run["bn"], run["timings"]
    work = [a + b for a, b in zip(adapt, bn, strict=True)]
    rows = [("wall time of the run", wall)]
    for i, (a, b) in enumerate(zip(adapt, bn, strict=True)):
        rows += [(f"site {i}: adaptation (adapt-seconds)", a), (f"site {i}: BN statistics and metrics (bn-seconds)", b)]
    rows += [(f"server {name}", seconds) for name, seconds in sorted(timings.items())]
    rows += [
        ("overhead = wall - longest site's work (sites fully overlapped)", wall - max(work, default=0.0)),
        ("overhead = wall - all sites' work (sites one after another)", wall - sum(work)),
        ("wall - server phases: runtime start-up, ClientApp start, transport, teardown", wall - sum(timings.values())),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep-eval", action="store_true", help="keep the preset's server-side evaluation")
    args = parser.parse_args()
    plan = SimulationPlan.preset(args.preset)
    print(f"preset {plan.name}: {plan.num_sites} sites, {plan.description}")
    print(f"run config: {plan.run_config}" + ("" if args.keep_eval else f" with {NO_EVAL}"))
    runs = [one_run(plan, args.keep_eval) for _ in range(args.repeats)]
    tables = [breakdown(run) for run in runs]
    header = "| what | " + " | ".join(f"run {i + 1} s" for i in range(len(runs)))
    header += " | median s |" if len(runs) > 1 else " |"
    print()
    print(header)
    print("|---|" + "---|" * (len(runs) + (1 if len(runs) > 1 else 0)))
    for i, (what, _) in enumerate(tables[0]):
        values = [table[i][1] for table in tables]
        cells = " | ".join(f"{v:.2f}" for v in values)
        median = f" | {statistics.median(values):.2f}" if len(runs) > 1 else ""
        print(f"| {what} | {cells}{median} |")


if __name__ == "__main__":
    main()
