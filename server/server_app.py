"""The Flower ServerApp: send the global model once, merge what comes back, write the results.

Results go to an absolute ``out-dir``: ``merged.safetensors`` and ``report.json``. Whatever
ends a run once it has started, the report is written with the status, the error and
every incident, and the partial merge is kept when at least one site was folded in, so
nothing received is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from common.bn.bank import BNBank, bank_to_checkpoint
from common.bn.stats import bn_count_profile
from common.config.run import RunConfig
from common.models.checkpoints import read_model_file, save_state
from common.models.factory import build_model
from common.models.fingerprint import INITIAL_SHA256, state_fingerprint
from common.scoring.evaluation import StateEvaluator
from common.updates.site import SiteUpdate
from server.config import ServerConfig
from server.fedavg import run_fedavg
from server.report import MergeReport
from server.results import MERGED_FILE, PARTIAL_FILE, REPORT_FILE, save_merged, save_update
from server.runtime import stop_on_sigterm
from server.strategy import OneShotMerge

__all__ = ["app", "run_merge"]

log = logging.getLogger(__name__)

app = ServerApp()


def _on_update(
    config: ServerConfig, report: MergeReport, evaluator: StateEvaluator | None
) -> Callable[[SiteUpdate, int], None]:
    """What happens to each accepted update before it is dropped: optional saving and scoring."""

    def handle(update: SiteUpdate, node_id: int) -> None:
        if config.run.save_updates:
            save_update(config.out_dir, node_id, update, config.run)
        if evaluator is not None and config.run.eval_sites:
            key = update.site if update.site not in report.eval_sites else f"{update.site} (node {node_id})"
            report.eval_sites[key] = evaluator(update.state_dict())

    return handle


def _fail(report: MergeReport, exc: BaseException, strategy: OneShotMerge, config: ServerConfig) -> None:
    """Record how the run ended and keep what was merged so far."""
    report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
    if strategy.engine.accepted:
        try:
            save_merged(strategy.engine, config.out_dir / PARTIAL_FILE, config.run)
        except Exception as save_exc:  # the report must still be written
            report.error += f"; the partial merge could not be written: {save_exc}"
    report.write(config.out_dir / REPORT_FILE)


def _bank(strategy: OneShotMerge, report: MergeReport) -> BNBank | None:
    """The BN bank the run asked for (or selected); recalibrated statistics only if the second round applied."""
    if not strategy.bank_source:
        return None
    source = strategy.bank_source
    if source == "recalibrated" and not report.recalibration.get("applied"):
        log.warning("bn-bank: the recalibration round was not applied; shipping the sites' own statistics")
        source = "own"
    bank = strategy.engine.bank(source, strategy.image_weight)
    report.config["bn_bank"] = {"statistics": source, "entries": list(bank.names), "image_weight": bank.image_weight}
    return bank


def _save_secure(state: dict[str, Tensor], config: ServerConfig, report: MergeReport) -> None:
    """The decoded sum as the merged model; with bn-image-weight, its own statistics ship as a one-entry bank."""
    run = config.run
    extra = {"merged_from": ",".join(s.domain for s in report.sites), "secure-aggregation": "true"}
    if run.bn_image_weight > 0:
        bank = BNBank.single("merged", state, run.bn_image_weight)
        bank_tensors, bank_meta = bank_to_checkpoint(bank)
        state, extra = {**state, **bank_tensors}, {**extra, **bank_meta}
        report.config["bn_bank"] = {"statistics": "merged", "entries": ["merged"], "image_weight": bank.image_weight}
    save_state(state, config.out_dir / MERGED_FILE, run.arch, run.num_classes, extra)


def run_merge(grid: Grid, config: ServerConfig) -> MergeReport:
    """The whole server side of a run; framework objects stay in here and the strategy."""
    run = config.run
    config.out_dir.mkdir(parents=True, exist_ok=True)
    report = MergeReport(config=config.describe())
    report.timings["serverapp-started-at"] = now = time.time()
    report.timings["serverapp-startup-seconds"] = now - psutil.Process().create_time()
    torch.manual_seed(run.seed)  # without initial weights, a seeded random start keeps runs comparable
    model = build_model(run.arch, run.num_classes, weights=run.initial_weights or None)
    template = model.state_dict()
    evaluator = (
        StateEvaluator(run.arch, run.num_classes, config.eval_specs, run.batch_size) if config.eval_specs else None
    )
    handle = _on_update(config, report, evaluator)
    strategy = OneShotMerge(
        config.merge, template, report, handle, profile=bn_count_profile(model), result_arrays=False
    )  # merged.safetensors is written from the engine's sums
    report.config["initial_sha256"] = fingerprint = state_fingerprint(template)
    initial = ArrayRecord(template) if run.send_initial_weights else ArrayRecord()
    try:
        strategy.start(grid, initial, train_config=ConfigRecord({INITIAL_SHA256: fingerprint}))
        if strategy.secure_state is not None:  # secure aggregation: only the sum was ever seen
            _save_secure(strategy.secure_state, config, report)
        else:
            save_merged(strategy.engine, config.out_dir / MERGED_FILE, run, _bank(strategy, report))
    except BaseException as exc:  # even a stop signal: what was received is written before the run ends
        _fail(report, exc, strategy, config)
        raise
    strategy.engine.release()
    if evaluator is not None:
        report.start("evaluation")
        merged = read_model_file(config.out_dir / MERGED_FILE)
        report.eval, report.eval_initial = evaluator(merged.state, merged.bank), evaluator(template)
        report.stop("evaluation")
    report.status = "ok"
    report.timings["serverapp-finished-at"] = time.time()
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
    stop_on_sigterm()  # a stopped run still writes its report and partial merge (see run_merge)
    config = ServerConfig.from_run(RunConfig.read(context.run_config), run_id=context.run_id)
    log.info("run %s: results go to %s", context.run_id, config.out_dir)
    if config.run.strategy == "fedavg":  # the multi-round baseline
        run_fedavg(grid, config)
        return
    run_merge(grid, config)
