"""Where a small simulation's wall time goes: fedmerge's ``tiny`` preset beside a trivial Flower app.

All run through the same driver (``server.runtime``: a SuperLink in simulation mode,
``flwr run``, teardown by PID), with 3 simulated sites. The trivial app (benchmarks/
trivial_app) is Flower's floor on this machine: ClientApps that echo a small array back,
Flower's own FedAvg, no torch. It runs a second time with its ServerApp and ClientApp
modules importing torch as they load, like any PyTorch Flower app: the floor for an app
that needs torch on both sides. Each run's time is split by wall-clock stamps the driver,
the ServerApp and the ClientApps record:

* runtime start-up: starting the SuperLink until it listens;
* run start-up: ``flwr run`` (FAB build and install, SuperExec, the simulation process,
  Ray) until the ServerApp's main starts, of which the ServerApp process's own start-up
  (imports) is shown apart;
* server until the train round: reading the config, building the model, waiting for nodes;
* backend and worker start-up: from the train round's start until the first ClientApp
  handler runs (Ray actors, the ClientApp's imports);
* ClientApp set-up (config, model, data), the sites' own work, and transport: from a
  ClientApp's reply until the server had it (the mean over sites);
* server after the last reply (merge, save, report), ServerApp end until ``flwr run``
  returns, and teardown.

    .venv/bin/python benchmarks/sim_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.runtime import simulation_env  # noqa: E402
from server.simulation import SimulationPlan, run_simulation  # noqa: E402

TRIVIAL_APP = ROOT / "benchmarks" / "trivial_app"
TORCH_SWITCH = "TRIVIAL_ECHO_TORCH"  # trivial_echo.TORCH_SWITCH: the Flower processes inherit it from here
NO_EVAL = {"eval-data": "", "eval-sites": False}
PROFILE = {"profile": True}
SITES = 3


def run_fedmerge(keep_eval: bool) -> dict[str, Any]:
    plan = SimulationPlan.preset("tiny")
    with tempfile.TemporaryDirectory(prefix="sim_overhead_") as tmp:
        started = time.time()
        report = run_simulation(plan, Path(tmp), PROFILE if keep_eval else {**NO_EVAL, **PROFILE})
    timings = report["timings"]
    sites = [s["metrics"] for s in report["sites"]]
    return {
        "driver": {**report["driver"], "started-at": started},
        "server": timings,
        "sites": sites,
        "work": [s.get("adapt-seconds", 0.0) + s.get("bn-seconds", 0.0) for s in sites],
    }


def run_trivial(with_torch: bool) -> dict[str, Any]:
    os.environ[TORCH_SWITCH] = "1" if with_torch else "0"
    with tempfile.TemporaryDirectory(prefix="sim_overhead_trivial_") as tmp:
        out = Path(tmp) / "timing.json"
        clock = {"started-at": time.time()}
        with simulation_env(Path(tmp) / ".flwr", SITES) as (env, connection):
            clock["superlink-ready-at"] = time.time()
            result = env.run_app(connection, {"out-file": str(out), "min-nodes": SITES}, 600, app_dir=TRIVIAL_APP)
            clock["flwr-run-ended-at"] = time.time()
        clock["stopped-at"] = time.time()
        if not out.is_file():
            raise RuntimeError(f"the trivial app failed: {(result.stdout + result.stderr)[-2000:]}")
        timing = json.loads(out.read_text())
    return {"driver": clock, "server": timing, "sites": timing["sites"], "work": [0.0] * len(timing["sites"])}


def split(run: dict[str, Any]) -> dict[str, float]:
    """The wall time of one run, phase by phase (seconds)."""
    d, s, sites = run["driver"], run["server"], run["sites"]
    first_client = min(x["clientapp-started-at"] for x in sites)
    last_reply = max(x["server-received-at"] for x in sites)
    setup = [x.get("clientapp-setup-seconds", 0.0) for x in sites]
    transport = [x["server-received-at"] - x["clientapp-replied-at"] for x in sites]
    return {
        "runtime start-up (SuperLink listening)": d["superlink-ready-at"] - d["started-at"],
        "run start-up (flwr run until the ServerApp's main)": s["serverapp-started-at"] - d["superlink-ready-at"],
        "  of which the ServerApp process's own start-up": s["serverapp-startup-seconds"],
        "server until the train round (config, model, nodes)": s["train-round-started-at"] - s["serverapp-started-at"],
        "backend and worker start-up (until the first ClientApp handler)": first_client - s["train-round-started-at"],
        "  of which a ClientApp worker's start-up (mean)": statistics.fmean(
            x["clientapp-startup-seconds"] for x in sites
        ),
        "ClientApp set-up: config, model, data (mean)": statistics.fmean(setup),
        "sites' own work (mean; adaptation and BN pass)": statistics.fmean(run["work"]),
        "transport and polling, reply to server (mean)": statistics.fmean(transport),
        "train round, first ClientApp handler to last reply received": last_reply - first_client,
        "server after the last reply (merge, save, report)": s["serverapp-finished-at"] - last_reply,
        "ServerApp end until flwr run returns": d["flwr-run-ended-at"] - s["serverapp-finished-at"],
        "teardown (every process stopped)": d["stopped-at"] - d["flwr-run-ended-at"],
        "wall time": d["stopped-at"] - d["started-at"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep-eval", action="store_true", help="keep the tiny preset's server-side evaluation")
    args = parser.parse_args()
    apps = {
        "trivial Flower app": lambda: run_trivial(with_torch=False),
        "trivial app importing torch": lambda: run_trivial(with_torch=True),
        "fedmerge tiny": lambda: run_fedmerge(args.keep_eval),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    for _ in range(args.repeats):  # interleaved, so the machine's load hits every app alike
        for name, run in apps.items():
            runs[name].append(split(run()))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"{SITES} simulated sites, median of {args.repeats} run(s) each, seconds\n")
    print("| phase | " + " | ".join(apps) + " |\n|---|" + "---:|" * len(apps))
    for phase in medians["fedmerge tiny"]:
        print(f"| {phase} | " + " | ".join(f"{medians[name][phase]:.2f}" for name in apps) + " |")
    ours = medians["fedmerge tiny"]["wall time"]
    for name in list(apps)[:2]:
        floor = medians[name]["wall time"]
        print(f"\nfedmerge tiny / {name}: {ours / floor:.2f}x, {ours - floor:+.1f} s", end="")
    print()


if __name__ == "__main__":
    main()
