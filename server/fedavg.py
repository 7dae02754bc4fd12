"""FedAvg over several rounds, with an aggregation that understands BN buffers.

Flower's stock ``FedAvg.aggregate_train`` accepts one ArrayRecord per reply and averages
every array as float64, so a fedmerge reply (``params``, ``buffers``, ``counts``) is
refused and ``num_batches_tracked`` would come back as a float. This subclass keeps
FedAvg's node sampling and message construction and replaces only the aggregation:
parameters weighted by each site's number of examples (FedAvg's rule), BN statistics
pooled by the merge accumulator (Gaussian by sample counts unless told otherwise),
integer buffers kept integer. It is the multi-round baseline the one-shot merge is
compared with: same local method, R rounds of traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from common.merging import MergeAccumulator, bn_layer_names
from common.models import build_model
from common.validation import UpdateRejected, validate_update
from common.wire import manifest, records_to_update
from server.config import MergeConfig, ServerConfig
from server.report import Incident, MergeReport, SiteEntry
from server.server_app import MERGED_FILE, REPORT_FILE, _save_state
from server.strategy import MinSitesNotMet

__all__ = ["BNFedAvg", "reply_bytes", "run_fedavg"]

log = logging.getLogger(__name__)


def reply_bytes(content: RecordDict) -> int:
    """Bytes of every record in a reply, as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())


class BNFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` reads fedmerge replies and pools BN statistics properly."""

    def __init__(self, template: Mapping[str, Tensor], config: MergeConfig, report: MergeReport) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=config.min_sites,
            min_available_nodes=config.min_sites,
        )
        self.template = dict(template)
        self.config = config
        self.report = report
        self.layers = bn_layer_names(self.template)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accumulator = MergeAccumulator(self.template, "counts", self.config.buffer_mode, self.config.equal_site_stats)
        accepted = 0
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._incident(
                    node_id, "", "failed", f"round {server_round}: error {reply.error.code}: {reply.error.reason}"
                )
                continue
            try:
                update = records_to_update(reply.content, fallback_site=f"node-{node_id}")
                validate_update(update, self.template)
            except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
                domain = exc.site if isinstance(exc, UpdateRejected) else ""
                self._incident(node_id, domain, "refused", f"round {server_round}: {exc}")
                continue
            accumulator.add(update)
            accepted += 1
            first = self.layers[0] if self.layers else None
            bn_values = int(update.counts[first].reshape(-1)[0]) if first else 0
            metrics = {"round": float(server_round), **update.metrics}
            entry = SiteEntry(update.site, node_id, update.num_examples, bn_values, reply_bytes(reply.content),
                              metrics, manifest(reply.content))  # fmt: skip
            self.report.sites.append(entry)
        if accepted < self.config.min_sites:
            raise MinSitesNotMet(
                f"round {server_round}: only {accepted} usable replies, min-sites is {self.config.min_sites}"
            )
        log.info("round %d: merged %d sites", server_round, accepted)
        return ArrayRecord(accumulator.result()), MetricRecord({"sites": accepted})

    def _incident(self, node_id: int, domain: str, kind: str, reason: str) -> None:
        log.warning("site %s (node %s) %s: %s", domain or "?", node_id, kind, reason)
        self.report.incidents.append(Incident(node_id, domain, kind, reason))


def run_fedavg(grid: Grid, config: ServerConfig, num_rounds: int) -> MergeReport:
    """R rounds of FedAvg from the initial weights; writes ``merged.safetensors`` and ``report.json``."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    report = MergeReport(config={**config.describe(), "strategy": "fedavg", "num_rounds": num_rounds})
    torch.manual_seed(config.seed)
    template = build_model(config.arch, config.num_classes, weights=config.initial_weights or None).state_dict()
    strategy = BNFedAvg(template, config.merge, report)
    report.start("rounds")
    try:
        result = strategy.start(
            grid,
            ArrayRecord(template),
            num_rounds=num_rounds,
            timeout=config.merge.timeout,
            train_config=ConfigRecord(),
        )
    except MinSitesNotMet as exc:
        report.status, report.error = "failed", str(exc)
        report.write(config.out_dir / REPORT_FILE)
        raise
    report.stop("rounds")
    merged = result.arrays.to_torch_state_dict()
    _save_state(merged, Path(config.out_dir) / MERGED_FILE, config, sorted({s.domain for s in report.sites}))
    report.status = "ok"
    report.write(config.out_dir / REPORT_FILE)
    return report
