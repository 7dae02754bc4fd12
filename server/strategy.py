"""The one-shot merge strategy: one round out, every reply merged as it arrives.

Flower's stock strategies collect every reply before aggregating, so server memory grows
with the number of sites. Here messages are pushed once and replies pulled one at a time
as they come; each is validated, folded into the sums and dropped before the next is
pulled, so the server holds the sums and at most one reply. A bad reply is refused with
its reason and never touches the sums. With ``recalibrate`` a second, light round asks
each site for BN sums under the merged parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from common.bnstats import BNSums
from common.merging import MergeAccumulator, SiteUpdate, bn_layer_names
from common.validation import UpdateRejected, validate_update
from common.wire import manifest, numpy_to_array, records_to_sums, records_to_update
from server.config import MergeConfig
from server.report import Incident, MergeReport, SiteEntry

__all__ = ["MinSitesNotMet", "OneShotMerge", "pool_bn_sums"]

log = logging.getLogger(__name__)


class MinSitesNotMet(RuntimeError):
    """Fewer usable replies than ``min-sites``: the run ends without a merged model."""


def _nbytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.values() if isinstance(rec, ArrayRecord))


def _message(content: RecordDict, message_type: str, node_id: int, group_id: str) -> Message:
    return Message(content=content, dst_node_id=node_id, message_type=message_type, group_id=group_id)


def _node_names(grid: Grid) -> dict[int, str]:
    """Names given at registration (``flwr supernode register --name``): they label nodes that never reply."""
    get_nodes = getattr(grid, "get_nodes", None)  # test doubles may only list ids
    return {int(n.node_id): str(getattr(n, "name", "")) for n in get_nodes()} if get_nodes else {}


def pool_bn_sums(pooled: dict[str, BNSums], sums: Mapping[str, BNSums], layers: list[str], site: str) -> None:
    """Check one site's recalibration sums, then add them to ``pooled``."""
    for layer in layers:
        if layer not in sums:
            raise UpdateRejected(site, repr(layer), "no BN sums for this layer")
        s = sums[layer]
        if not (torch.isfinite(s.sum).all() and torch.isfinite(s.sum_sq).all()):
            raise UpdateRejected(site, repr(layer), "NaN or Inf in BN sums")
        if bool((s.count <= 0).any()):
            raise UpdateRejected(site, repr(layer), f"count n = {int(s.count.min())} (must be > 0)")
    for layer in layers:
        pooled[layer] = pooled[layer] + sums[layer] if layer in pooled else sums[layer]


class OneShotMerge(Strategy):
    """Merge every site once: linear parameters, Gaussian BN buffers, optional recalibration."""

    def __init__(
        self,
        config: MergeConfig,
        template: Mapping[str, Tensor],
        report: MergeReport | None = None,
        on_update: Callable[[SiteUpdate], None] | None = None,
    ) -> None:
        self.config = config
        self.template = dict(template)
        self.report = report or MergeReport()
        self.on_update = on_update
        self.layers = bn_layer_names(self.template)
        self.accumulator = self._new_accumulator()
        self.node_names: dict[int, str] = {}

    def _new_accumulator(self) -> MergeAccumulator:
        return MergeAccumulator(
            self.template,
            self.config.param_weighting,
            self.config.buffer_mode,
            self.config.equal_site_stats,
            param_dtype=self.config.param_dtype,
        )

    # ----- Message-API hooks ------------------------------------------------------------
    def summary(self) -> None:
        log.info("OneShotMerge: %s", self.config)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        node_ids = self._wait_for_nodes(grid)
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [_message(content, MessageType.TRAIN, nid, str(server_round)) for nid in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            self.receive(reply, reply.metadata.src_node_id)
        return self.finish()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # evaluation, when asked for, happens on the server (see server_app)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ----- one reply at a time ---------------------------------------------------------
    def receive(self, reply: Message, node_id: int) -> bool:
        """Validate one reply and fold it into the sums; False (and an incident) if refused."""
        if reply.has_error():
            err = reply.error
            self._incident(node_id, "", "failed", f"error code {err.code}: {err.reason}")
            return False
        try:
            update = records_to_update(reply.content, fallback_site=f"node-{node_id}")
            validate_update(update, self.template)
        except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
            domain = exc.site if isinstance(exc, UpdateRejected) else ""
            self._incident(node_id, domain, "refused", str(exc).strip("'\""))
            return False
        self.accumulator.add(update)
        first = self.layers[0] if self.layers else None
        bn_values = int(update.counts[first].reshape(-1)[0]) if first else 0
        entry = SiteEntry(
            update.site, node_id, update.num_examples, bn_values, _nbytes(reply.content), update.metrics,
            manifest(reply.content), self.node_names.get(node_id, ""),
        )  # fmt: skip
        self.report.sites.append(entry)
        log.info("merged site %s (node %s, %d images)", update.site, node_id, update.num_examples)
        if self.on_update is not None:
            self.on_update(update)
        return True

    def _incident(self, node_id: int, domain: str, kind: str, reason: str) -> None:
        name = self.node_names.get(node_id, "")
        log.warning("site %s (node %s %s) %s: %s", domain or "?", node_id, name, kind, reason)
        self.report.incidents.append(Incident(node_id, domain, kind, reason, name))

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = len(self.report.sites)
        if accepted < self.config.min_sites:
            raise MinSitesNotMet(
                f"only {accepted} usable site update(s), min-sites is {self.config.min_sites}: "
                + ("; ".join(f"node {i.node_id} {i.kind}: {i.reason}" for i in self.report.incidents) or "no replies")
            )
        metrics = {"sites": accepted, "num-examples": sum(s.num_examples for s in self.report.sites)}
        return self._merged_record(), MetricRecord(metrics)

    def _merged_record(self) -> ArrayRecord:
        """The merged model serialised one tensor at a time (as ``ArrayRecord(state_dict)`` does).

        Building the whole state dict first would hold a second model beside the sums.
        """
        record = ArrayRecord()
        for key, tensor in self.accumulator.iter_result():
            record[key] = numpy_to_array(tensor.detach().cpu().numpy())
        return record

    # ----- the streaming driver --------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.config.timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.config.min_sites or time.monotonic() > deadline:
                break
            time.sleep(self.config.poll_interval)
        self.node_names = _node_names(grid)
        if len(nodes) < self.config.min_sites:
            raise MinSitesNotMet(
                f"only {len(nodes)} site(s) connected within {self.config.timeout:.0f}s, min-sites is "
                f"{self.config.min_sites}"
            )
        return nodes

    def _stream(self, grid: Grid, messages: list[Message], handle: Callable[[Message, int], object]) -> None:
        """Push once, pull replies as they come, hand each to ``handle``, record the silent ones."""
        ids = list(grid.push_messages(messages))
        pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True) if mid}
        deadline = time.monotonic() + self.config.timeout
        while pending and time.monotonic() < deadline:
            for message_id in list(pending):
                self._pull_one(grid, message_id, pending, handle)
            if pending:
                time.sleep(self.config.poll_interval)
        for node_id in pending.values():
            self._incident(node_id, "", "timeout", f"no reply within {self.config.timeout:.0f}s")

    @staticmethod
    def _pull_one(
        grid: Grid, message_id: str, pending: dict[str, int], handle: Callable[[Message, int], object]
    ) -> None:
        """Pull and handle the reply to one message, if it is there.

        ``Grid.pull_messages`` inflates every ready reply among the ids it is given, so
        asking for all pending ids at once would hold every reply that arrived meanwhile.
        One id per call, in a function whose locals die on return, keeps one in memory.
        """
        for reply in grid.pull_messages([message_id]):
            node_id = pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            handle(reply, node_id)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 1,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """One round out and back, merged as it streams in; ``num_rounds`` must be 1."""
        if num_rounds != 1:
            raise ValueError("OneShotMerge runs exactly one round")
        self.summary()
        self.report.start("train-round")
        messages = self.configure_train(1, initial_arrays, train_config or ConfigRecord(), grid)
        self._stream(grid, messages, self.receive)
        self.report.stop("train-round")
        self.report.start("merge-finish")
        arrays, metrics = self.finish()
        self.report.stop("merge-finish")
        if self.config.recalibrate:
            arrays = self.recalibrate(grid, arrays)
        result = Result()
        result.arrays = arrays
        if metrics is not None:
            result.train_metrics_clientapp[1] = metrics
        if evaluate_fn is not None:
            res = evaluate_fn(1, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[1] = res
        return result

    # ----- second round: statistics under the merged parameters ------------------------
    def recalibrate(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Replace the merged BN statistics by ones pooled from sums measured under the merged parameters."""
        self.report.start("recalibration-round")
        pooled: dict[str, BNSums] = {}
        replied: list[str] = []

        def handle(reply: Message, node_id: int) -> None:
            if reply.has_error():
                self._incident(
                    node_id, "", "failed", f"recalibration error code {reply.error.code}: {reply.error.reason}"
                )
                return
            site = str(reply.content["info"].get("domain", f"node-{node_id}")) if "info" in reply.content else ""
            try:
                pool_bn_sums(pooled, records_to_sums(reply.content), self.layers, site)
            except (UpdateRejected, KeyError) as exc:
                self._incident(node_id, site, "refused", f"recalibration: {exc}")
                return
            replied.append(site)

        config = ConfigRecord({"bn-mode": self.config.recalibrate_mode, "phase": "recalibrate"})
        content = RecordDict({"arrays": arrays, "config": config})
        nodes = [s.node_id for s in self.report.sites]
        messages = [_message(content, MessageType.QUERY, nid, "recalibrate") for nid in nodes]
        self._stream(grid, messages, handle)
        self.report.stop("recalibration-round")
        if len(replied) < self.config.min_sites:
            self.report.recalibration = {"applied": False, "sites": replied, "reason": "fewer replies than min-sites"}
            log.warning("recalibration skipped: only %d site(s) replied", len(replied))
            return arrays
        state = arrays.to_torch_state_dict()
        for layer, s in pooled.items():
            state[f"{layer}.running_mean"] = s.mean().to(state[f"{layer}.running_mean"].dtype)
            state[f"{layer}.running_var"] = s.var().to(state[f"{layer}.running_var"].dtype)
        self.report.recalibration = {"applied": True, "sites": replied}
        return ArrayRecord(state)
