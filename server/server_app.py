"""The Flower ServerApp: send the global model once, merge what comes back, write the results.

Results go to an absolute ``out-dir``: ``merged.safetensors`` and ``report.json``. A run
that cannot meet ``min-sites`` still writes its report (and the partial merge, if any
site was accepted) before it fails, so nothing received is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from common.checkpoints import save_state
from common.evaluation import StateEvaluator
from common.fingerprint import INITIAL_SHA256, state_fingerprint
from common.merging import SiteUpdate
from common.models import build_model
from common.update_format import save_site_update
from server.config import ServerConfig
from server.report import MergeReport
from server.strategy import MinSitesNotMet, OneShotMerge

__all__ = ["MERGED_FILE", "REPORT_FILE", "app", "run_merge"]

log = logging.getLogger(__name__)
MERGED_FILE = "merged.safetensors"
PARTIAL_FILE = "partial-merged.safetensors"
REPORT_FILE = "report.json"
UPDATES_DIR = "updates"

app = ServerApp()


def _save_state(state: dict[str, Tensor], path: Path, config: ServerConfig, sites: list[str]) -> None:
    save_state(state, path, config.arch, config.num_classes, {"merged_from": ",".join(sites)})


def _on_update(config: ServerConfig, report: MergeReport, evaluator: StateEvaluator | None):
    """What happens to each accepted update before it is dropped: optional saving and scoring."""
    folder = config.out_dir / UPDATES_DIR
    if config.save_updates:
        folder.mkdir(parents=True, exist_ok=True)

    def handle(update: SiteUpdate) -> None:
        if config.save_updates:
            save_site_update(folder / f"{update.site}.safetensors", update, config.arch, config.num_classes)
        if evaluator is not None and config.eval_sites:
            report.eval_sites[update.site] = evaluator(update.state_dict())

    return handle


def run_merge(grid: Grid, config: ServerConfig) -> MergeReport:
    """The whole server side of a run; framework objects stay in here and the strategy."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    report = MergeReport(config=config.describe())
    torch.manual_seed(config.seed)  # without initial weights, a seeded random start keeps runs comparable
    template = build_model(config.arch, config.num_classes, weights=config.initial_weights or None).state_dict()
    evaluator = None
    if config.eval_specs:
        evaluator = StateEvaluator(config.arch, config.num_classes, config.eval_specs, config.batch_size)
    strategy = OneShotMerge(config.merge, template, report, _on_update(config, report, evaluator))
    report.config["initial_sha256"] = fingerprint = state_fingerprint(template)
    initial = ArrayRecord(template) if config.send_initial_weights else ArrayRecord()
    try:
        result = strategy.start(grid, initial, train_config=ConfigRecord({INITIAL_SHA256: fingerprint}))
    except MinSitesNotMet as exc:
        report.status, report.error = "failed", str(exc)
        if strategy.accumulator.sites:
            _save_state(
                strategy.accumulator.result(), config.out_dir / PARTIAL_FILE, config, strategy.accumulator.sites
            )
        report.write(config.out_dir / REPORT_FILE)
        raise
    merged = result.arrays.to_torch_state_dict()
    _save_state(merged, config.out_dir / MERGED_FILE, config, [s.domain for s in report.sites])
    if evaluator is not None:
        report.start("evaluation")
        report.eval, report.eval_initial = evaluator(merged), evaluator(template)
        report.stop("evaluation")
    report.status = "ok"
    report.write(config.out_dir / REPORT_FILE)
    log.info("merged %d sites into %s", len(report.sites), config.out_dir / MERGED_FILE)
    return report


def _log_through_flower() -> None:
    """Send this project's INFO logs where Flower's go, so ``flwr run --stream`` shows the merge's progress."""
    handlers = logging.getLogger("flwr").handlers
    for name in ("server", "common"):
        logger = logging.getLogger(name)
        if handlers and not logger.handlers:
            logger.handlers = list(handlers)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_through_flower()
    config = ServerConfig.from_run_config(context.run_config)
    if str(context.run_config.get("strategy", "one-shot")) == "fedavg":  # the multi-round baseline
        from server.fedavg import run_fedavg

        run_fedavg(grid, config, int(context.run_config.get("num-rounds", 1)))
        return
    run_merge(grid, config)
