"""``fedavg-rounds``: Flower's FedAvg over R rounds, run in Flower's own simulation engine.

The baseline is run for real, not emulated: a SuperLink, one SuperNode per site, the
project's ClientApp running the same local method on the same data, and the ServerApp's
FedAvg strategy (``server.fedavg``). Its communication comes from the server's report:
what every reply weighed, every round. The result is cached like a site update, keyed
by everything that produced it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from clients.adaptation import METHODS
from common.device.runtime import resolve_compute
from common.models.fingerprint import recipe_key
from experiments.config import ExperimentConfig
from experiments.pool import CACHE_VERSION, SourceBundle
from server.simulation import SimulationPlan, run_simulation

__all__ = ["FedAvgRun", "round_options", "run_fedavg_rounds"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedAvgRun:
    state: dict
    rounds: int
    bytes_sent: dict[str, int]  # site -> bytes of all its replies
    site_seconds: float  # the slowest site's adaptation seconds, summed over rounds
    wall_seconds: float  # the whole Flower run, start-up included
    options: dict[str, Any]  # the method options each round ran with


def round_options(config: ExperimentConfig, rounds: int, split_steps: bool) -> dict[str, Any]:
    """The method options of one round: with ``split_steps`` each round runs ``ceil(steps / R)`` steps."""
    options = dict(config.method.options)
    typed = METHODS.get(config.method.name).make_options(options)
    if split_steps and hasattr(typed, "steps"):
        options["steps"] = max(1, math.ceil(int(typed.steps) / rounds))
    return options


def _run_values(
    config: ExperimentConfig, source: SourceBundle, rounds: int, options: Mapping[str, Any], buffers: str
) -> dict[str, Any]:
    """The run config of this experiment's Flower run; each partition gets its site's data spec, by name."""
    guard = config.method.guard
    return {
        "arch": source.arch,
        "num-classes": source.num_classes,
        "initial-weights": str(source.path),
        "site-data": ";".join(f"{s.name}={s.data}" for s in config.sites),
        "source-data": str(config.method.source) if config.method.source else "",
        "seed": config.seed,
        "method": config.method.name,
        "method-options": " ".join(f"{k}={v}" for k, v in options.items()),
        "batch-size": config.method.batch_size,
        "min-sites": len(config.sites),
        "strategy": "fedavg",
        "num-rounds": rounds,
        "buffer-mode": buffers,
        "timeout": 3600.0,
        **guard.values(),
        "device": config.compute.device,
        "amp": config.compute.amp,
        "backbone-weights": config.method.backbone_weights,
    }


def _key(config: ExperimentConfig, source: SourceBundle, rounds: int, options: Mapping[str, Any], buffers: str) -> str:
    return recipe_key(
        {
            "version": CACHE_VERSION,
            "source": source.fingerprint,
            "sites": [f"{s.name}={s.data}" for s in config.sites],
            "method": config.method.name,
            "options": repr(METHODS.get(config.method.name).make_options(options)),
            "batch_size": config.method.batch_size,
            "method_source": str(config.method.source) if config.method.source else "",
            "seed": config.seed,
            "rounds": rounds,
            "buffers": buffers,
            **config.method.guard.recipe(),
            **config.method.recipe(),
            **resolve_compute(config.compute).recipe(),  # "auto" keys as what it means on this machine
        }
    )


def run_fedavg_rounds(
    config: ExperimentConfig, source: SourceBundle, cache_dir: Path, rounds: int, split_steps: bool, buffers: str
) -> FedAvgRun:
    """Run (or read back) R rounds of FedAvg through a real Flower simulation."""
    options = round_options(config, rounds, split_steps)
    folder = (cache_dir / "fedavg" / _key(config, source, rounds, options, buffers)).resolve()
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        log.info("fedavg-rounds: %d rounds of %s (%s) through Flower", rounds, config.method.name, options)
        started = time.perf_counter()
        plan = SimulationPlan("fedavg-rounds", len(config.sites))
        report = run_simulation(plan, folder, _run_values(config, source, rounds, options, buffers))
        wall = time.perf_counter() - started
        bytes_sent: dict[str, int] = {}
        per_round: dict[int, float] = {}
        for entry in report["sites"]:
            bytes_sent[entry["domain"]] = bytes_sent.get(entry["domain"], 0) + int(entry["bytes_received"])
            r = int(entry["metrics"]["round"])
            per_round[r] = max(per_round.get(r, 0.0), float(entry["metrics"].get("adapt-seconds", 0.0)))
        summary = {"rounds": rounds, "bytes_sent": bytes_sent, "site_seconds": sum(per_round.values()),
                   "wall_seconds": wall, "options": options}  # fmt: skip
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
    else:
        log.info("fedavg-rounds: reusing %s", folder)
    summary = json.loads(summary_path.read_text())
    return FedAvgRun(
        state=load_file(str(folder / "merged.safetensors")),
        rounds=int(summary["rounds"]),
        bytes_sent={k: int(v) for k, v in summary["bytes_sent"].items()},
        site_seconds=float(summary["site_seconds"]),
        wall_seconds=float(summary["wall_seconds"]),
        options=dict(summary["options"]),
    )
