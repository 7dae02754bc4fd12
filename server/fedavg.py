"""FedAvg over several rounds, with an aggregation that understands BN buffers.

Flower's stock ``FedAvg.aggregate_train`` accepts one ArrayRecord per reply and averages
every array as float64, so a fedmerge reply (``params``, ``buffers``, ``counts``) is
refused and ``num_batches_tracked`` would come back as a float. This subclass keeps
FedAvg's node sampling and message construction and replaces only the aggregation with
the merge engine: parameters weighted by each site's number of examples (FedAvg's rule),
BN statistics by the run's buffer mode, integer buffers kept integer. It is the
multi-round baseline the one-shot merge is compared with: same local method, R rounds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from common.bn.stats import CountProfile, bn_count_profile
from common.merge.engine import MergeEngine
from common.models.factory import build_model
from server.config import MergeConfig, ServerConfig
from server.intake import ReplyIntake
from server.messages import claimed_weight, state_record
from server.report import MergeReport
from server.results import MERGED_FILE, REPORT_FILE, save_merged
from server.rounds.base import MinSitesNotMet

__all__ = ["BNFedAvg", "run_fedavg"]

log = logging.getLogger(__name__)


class BNFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` reads fedmerge replies and pools BN statistics properly."""

    def __init__(
        self,
        template: Mapping[str, Tensor],
        config: MergeConfig,
        report: MergeReport,
        profile: CountProfile | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=config.min_sites,
            min_available_nodes=config.min_sites,
        )
        self.template = dict(template)
        self.config = config
        self.report = report
        self.spec = dataclasses.replace(config.spec, method="linear", weighting="counts")
        self.profile = profile
        self.engine: MergeEngine | None = None  # the last round's, whose result is the run's model

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # FedAvg hands every reply at once; they are all in memory already
        self.engine = engine = MergeEngine(self.spec, self.template, self.profile)
        claims = [n for n in (claimed_weight(r) for r in replies) if n is not None]
        if claims and self.spec.max_share < 1.0:
            engine.expect_weights(claims)
        intake = ReplyIntake(engine, self.report, label=f"round {server_round}: ")
        accepted = sum(intake.take_update(reply, reply.metadata.src_node_id) for reply in replies)
        for entry in self.report.sites[len(self.report.sites) - accepted :]:
            entry.metrics = {"round": float(server_round), **entry.metrics}
        if accepted < self.config.min_sites:
            raise MinSitesNotMet(
                f"round {server_round}: only {accepted} usable replies, min-sites is {self.config.min_sites}"
            )
        log.info("round %d: merged %d sites", server_round, accepted)
        return state_record(engine.iter_result()), MetricRecord({"sites": accepted})


def run_fedavg(grid: Grid, config: ServerConfig) -> MergeReport:
    """R rounds of FedAvg from the initial weights; writes ``merged.safetensors`` and ``report.json``."""
    run = config.run
    config.out_dir.mkdir(parents=True, exist_ok=True)
    report = MergeReport(config={**config.describe(), "strategy": "fedavg", "num_rounds": run.num_rounds})
    torch.manual_seed(run.seed)
    model = build_model(run.arch, run.num_classes, weights=run.initial_weights or None)
    template = model.state_dict()
    strategy = BNFedAvg(template, config.merge, report, bn_count_profile(model))
    report.start("rounds")
    try:
        strategy.start(grid, ArrayRecord(template), num_rounds=run.num_rounds, timeout=run.timeout,
                       train_config=ConfigRecord())  # fmt: skip
    except MinSitesNotMet as exc:
        report.status, report.error = "failed", str(exc)
        report.write(config.out_dir / REPORT_FILE)
        raise
    report.stop("rounds")
    assert strategy.engine is not None
    save_merged(strategy.engine, config.out_dir / MERGED_FILE, run)
    report.status = "ok"
    report.write(config.out_dir / REPORT_FILE)
    return report
