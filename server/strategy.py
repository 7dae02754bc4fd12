"""The one-shot merge strategy: one round out, every reply merged as it arrives.

Flower's stock strategies collect every reply before aggregating, so server memory grows
with the number of sites. Here messages are pushed once and replies pulled one at a time
as they come; each goes through :class:`~server.intake.ReplyIntake` into the merge engine
and is dropped before the next is pulled, so the server holds the sums and at most one
reply. With ``recalibrate`` a second, light round asks each site for BN sums under the
merged parameters. The maths is all in ``common.merge.engine``; this module is transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from common.bn.stats import CountProfile
from common.merge.bn_pooling import capped_shares
from common.merge.engine import MergeEngine
from common.secure.layout import decode_merge, decode_statistics, merge_layout, statistics_layout
from common.updates.site import SiteUpdate, site_label
from common.updates.wire import claimed_examples, numpy_to_array, wire_bytes
from server.config import MergeConfig
from server.intake import ReplyIntake
from server.report import MergeReport, SiteEntry
from server.secure_round import SecureOutcome, SecureSum, threshold_for
from server.selection_round import Candidate, SelectionRound

__all__ = ["MessageFactory", "MinSitesNotMet", "OneShotMerge", "flower_message"]

log = logging.getLogger(__name__)
MessageFactory = Callable[[RecordDict, int, str, str], Message]


class MinSitesNotMet(RuntimeError):
    """Fewer usable replies than ``min-sites``: the run ends without a merged model."""


def flower_message(content: RecordDict, node_id: int, message_type: str, group_id: str) -> Message:
    """A message to one node; only possible inside a Flower run (tests pass their own factory)."""
    return Message(content=content, dst_node_id=node_id, message_type=message_type, group_id=group_id)


def claimed_weight(reply: Message) -> int | None:
    """A reply's claimed number of examples, if it can be read: weights must be known before capping."""
    if reply.has_error():
        return None
    try:
        return claimed_examples(reply.content)
    except Exception:  # an unreadable reply is refused later, with its reason, by the intake
        return None


def _node_names(grid: Grid) -> dict[int, str]:
    """Names given at registration (``flwr supernode register --name``): they label nodes that never reply."""
    get_nodes = getattr(grid, "get_nodes", None)  # test doubles may only list ids
    return {int(n.node_id): str(getattr(n, "name", "")) for n in get_nodes()} if get_nodes else {}


def state_record(items: Iterable[tuple[str, Tensor]]) -> ArrayRecord:
    """An ArrayRecord built one tensor at a time, as ``ArrayRecord(state_dict)`` does without a whole dict."""
    record = ArrayRecord()
    for key, tensor in items:
        record[key] = numpy_to_array(tensor.detach().cpu().numpy())
    return record


class OneShotMerge(Strategy):
    """Merge every site once by the run's merge spec; optional recalibration of the BN statistics."""

    def __init__(
        self,
        config: MergeConfig,
        template: Mapping[str, Tensor],
        report: MergeReport | None = None,
        on_update: Callable[[SiteUpdate, int], None] | None = None,
        make_message: MessageFactory = flower_message,
        profile: CountProfile | None = None,
    ) -> None:
        self.config = config
        self.report = report or MergeReport()
        self.engine = MergeEngine(config.spec, template, profile)
        self.bank_source = config.bn_bank  # which BN statistics ship with the merge ("" for none)
        self.candidates = [  # a label-free selection's candidate merges, one engine each (shared when specs agree)
            Candidate(c, self.engine if c.spec == config.spec else MergeEngine(c.spec, template, profile))
            for c in config.candidates
        ]
        self.intake = ReplyIntake(self.engine, self.report, on_update=self._fan_out(on_update))
        self.make_message = make_message
        self.secure_state: dict[str, Tensor] | None = None  # the merged model, in secure mode
        self.secure_sites: dict[int, str] = {}  # node id -> reported label, in secure mode
        self.secure_bytes: dict[int, int] = {}  # node id -> bytes of its key advertisements

    def _fan_out(self, on_update: Callable[[SiteUpdate, int], None] | None) -> Callable[[SiteUpdate, int], None] | None:
        """After an update entered the main engine: into every other candidate's engine, then ``on_update``."""
        if not self.config.candidates:
            return on_update

        def handle(update: SiteUpdate, node_id: int) -> None:
            for candidate in self.candidates:
                if candidate.engine is not self.engine:
                    candidate.engine.ingest(update)
            if on_update is not None:
                on_update(update, node_id)

        return handle

    def select(self, grid: Grid) -> None:
        """The label-free selection round: the chosen candidate's engine becomes the merge."""
        self.report.start("selection-round")
        nodes = [s.node_id for s in self.report.sites]
        chooser = SelectionRound(grid, self._stream, self.make_message, self.config.select_score,
                                 self.config.select_aggregate)  # fmt: skip
        chosen = chooser.run(self.candidates, nodes)
        self.engine, self.bank_source = chosen.engine, chosen.config.bn_bank
        self.report.selection = {"score": self.config.select_score, "aggregate": self.config.select_aggregate,
                                 "chosen": chosen.config.label, "candidates": [c.config.label for c in self.candidates],
                                 "replies": chooser.record}  # fmt: skip
        self.report.stop("selection-round")

    # ----- Message-API hooks ------------------------------------------------------------
    def summary(self) -> None:
        """The run's merge in the shape of Flower's own strategy summaries, one setting per line."""
        c, spec = self.config, self.config.spec
        options = " ".join(f"{k}={v}" for k, v in vars(spec.options).items())
        then = [f"label-free selection among {len(c.candidates)} candidates ({c.select_aggregate} {c.select_score})"
                ] if c.candidates else []  # fmt: skip
        then += [f"recalibration round ({c.recalibrate_mode})"] if c.recalibrate else []
        lines = [
            f"method: {spec.method}" + (f" ({options})" if options else ""),
            f"site weights: {spec.weighting}, at most {spec.max_share:g} each",
            f"BN statistics: {spec.buffers}"
            + (", sites weighted equally" if spec.equal_site_stats else "")
            + (f", with a bank of the sites' {c.bn_bank} statistics" if c.bn_bank else ""),
            f"sums: {spec.precision}"
            + (", secure aggregation (the server sees only sums)" if c.secure else "")
            + (f"; clip-norm {spec.clip_norm:g}" if spec.clip_norm else ""),
            f"at least {c.min_sites} sites, waiting up to {c.timeout:g} s",
            "then: " + (", ".join(then) or "nothing"),
        ]
        log.info("OneShotMerge settings:")
        for i, line in enumerate(lines):
            log.info("\t%s── %s", "└" if i == len(lines) - 1 else "├", line)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return self._train_messages(self._wait_for_nodes(grid), server_round, arrays, config)

    def _train_messages(
        self, node_ids: list[int], server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [self.make_message(content, nid, MessageType.TRAIN, str(server_round)) for nid in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # Flower's own loop hands them all at once
        if self._needs_census():
            self.engine.expect_weights([n for n in (claimed_weight(r) for r in replies) if n is not None])
        for reply in replies:
            self.intake.take_update(reply, reply.metadata.src_node_id)
        return self.finish()

    def _needs_census(self) -> bool:
        """Capped shares of weights that differ per site: every claim must be known before the first is summed."""
        return self.config.spec.weighting != "uniform" and self.config.spec.max_share < 1.0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # evaluation, when asked for, happens on the server (see server_app)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = len(self.report.sites)
        if accepted < self.config.min_sites:
            raise MinSitesNotMet(
                f"only {accepted} usable site update(s), min-sites is {self.config.min_sites}: "
                + ("; ".join(f"node {i.node_id} {i.kind}: {i.reason}" for i in self.report.incidents) or "no replies")
            )
        metrics = {"sites": accepted, "num-examples": sum(s.num_examples for s in self.report.sites)}
        return state_record(self.engine.iter_result()), MetricRecord(metrics)

    # ----- the streaming driver --------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.config.timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.config.min_sites or time.monotonic() > deadline:
                break
            time.sleep(self.config.poll_interval)
        self.intake.node_names.update(_node_names(grid))
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
            self.intake.incident(node_id, "", "timeout", f"no reply within {self.config.timeout:.0f}s")

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
        nodes = self._wait_for_nodes(grid)
        if self.config.secure:
            return self._start_secure(grid, nodes, initial_arrays, train_config or ConfigRecord())
        if self._needs_census():
            self.census(grid, nodes)
        self.report.start("train-round")
        self.report.timings["train-round-started-at"] = time.time()
        train_config = train_config or ConfigRecord()
        if self.candidates:
            train_config["keep-own"] = True  # each site keeps its adapted model to score candidates against
        messages = self._train_messages(nodes, 1, initial_arrays, train_config)
        self._stream(grid, messages, self.intake.take_update)
        self.report.stop("train-round")
        if self.candidates and len(self.report.sites) >= self.config.min_sites:
            self.select(grid)
        self.report.start("merge-finish")
        arrays, metrics = self.finish()
        self.report.stop("merge-finish")
        if self.config.recalibrate and self._has_bn_to_recalibrate():
            self.recalibrate(grid, arrays)
        result = Result()
        result.arrays = arrays
        if metrics is not None:
            result.train_metrics_clientapp[1] = metrics
        if evaluate_fn is not None:
            res = evaluate_fn(1, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[1] = res
        return result

    # ----- secure aggregation: the same merge, learning only sums ---------------------
    def _start_secure(self, grid: Grid, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord) -> Result:
        self.report.start("train-round")
        config["secure"] = True
        self.report.timings["train-round-started-at"] = time.time()
        keys, claims = self._advertised(grid, self._train_messages(nodes, 1, arrays, config), "train")
        self.report.stop("train-round")
        if len(keys) < self.config.min_sites:
            raise MinSitesNotMet(f"only {len(keys)} site(s) adapted and advertised keys, min-sites is "
                                 f"{self.config.min_sites}")  # fmt: skip
        self.report.start("secure-sum")
        weights = self._secure_weights(claims)
        layout = merge_layout(self.engine.template, len(keys))
        outcome = self._secure_sum(grid, keys, "merge").run(layout, weights)
        self.report.stop("secure-sum")
        totals = [sum(weights[n][i] for n in outcome.survivors) for i in (0, 1)]
        self.secure_state = decode_merge(outcome.segments, self.engine.template, *totals)
        self._record_secure(outcome, claims, "merge")
        merged = state_record(self.secure_state.items())
        if self.config.recalibrate and self._has_bn_to_recalibrate():
            self._recalibrate_secure(grid, merged, outcome.survivors, weights)
        result = Result()
        result.arrays = merged
        return result

    def _advertised(
        self, grid: Grid, messages: list[Message], phase: str
    ) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, int]]:
        keys: dict[int, tuple[bytes, bytes]] = {}
        claims: dict[int, int] = {}

        def handle(reply: Message, node_id: int) -> None:
            if reply.has_error():
                self.intake.incident(node_id, "", "failed", f"secure {phase}: error code {reply.error.code}: "
                                     f"{reply.error.reason}")  # fmt: skip
                return
            self.secure_bytes[node_id] = self.secure_bytes.get(node_id, 0) + wire_bytes(reply.content)
            try:
                record = reply.content["keys"]
                keys[node_id] = (bytes(record["share-public"]), bytes(record["mask-public"]))
                claims[node_id] = claimed_examples(reply.content)
                self.secure_sites[node_id] = site_label(reply.content["info"].get("domain", ""), f"node-{node_id}")
            except Exception as exc:  # untrusted reply
                keys.pop(node_id, None)
                self.intake.incident(node_id, "", "refused", f"secure {phase}: unreadable reply: {exc}")

        self._stream(grid, messages, handle)
        return keys, {n: claims[n] for n in keys}

    def _secure_weights(self, claims: dict[int, int]) -> dict[int, tuple[float, float]]:
        """(parameter, statistics) weight of each site: 1, or its capped share of the claimed images."""
        nodes = sorted(claims)
        shares = capped_shares(np.array([float(claims[n]) for n in nodes]), self.config.spec.max_share)
        spec = self.config.spec
        return {
            n: (float(s) if spec.weighting == "counts" else 1.0, 1.0 if spec.equal_site_stats else float(s))
            for n, s in zip(nodes, shares, strict=True)
        }

    def _secure_sum(self, grid: Grid, keys: dict[int, tuple[bytes, bytes]], kind: str) -> SecureSum:
        threshold = threshold_for(len(keys), self.config.min_sites)
        return SecureSum(grid, self._stream, self.make_message, keys, threshold, kind)

    def _record_secure(self, outcome: SecureOutcome, claims: dict[int, int], kind: str) -> None:
        for node in outcome.dropped_before_input:
            self.intake.incident(node, self.secure_sites.get(node, ""), "failed",
                                 f"secure {kind}: dropped out before sending its masked vector")  # fmt: skip
        for node in outcome.dropped_after_input:
            reason = f"secure {kind}: sent its masked vector, then dropped out (still in the sum)"
            self.intake.incident(node, self.secure_sites.get(node, ""), "dropout", reason)
        if kind == "merge":
            for node in outcome.survivors:
                sent = outcome.bytes_received.get(node, 0) + self.secure_bytes.get(node, 0)
                self.report.sites.append(SiteEntry(self.secure_sites[node], node, claims[node], 0, sent))
        self.report.secure[kind] = {"survivors": outcome.survivors, "threshold": threshold_for(
            len(claims), self.config.min_sites), "relative_error_bound": outcome.relative_error}  # fmt: skip

    def _recalibrate_secure(
        self, grid: Grid, merged: ArrayRecord, nodes: list[int], weights: dict[int, tuple[float, float]]
    ) -> None:
        """The recalibration round as a second secure sum of the sites' moments under the merged model."""
        self.report.start("recalibration-round")
        config = ConfigRecord(
            {"phase": "secagg-advertise", "sum": "statistics", "bn-mode": self.config.recalibrate_mode}
        )
        messages = [self.make_message(RecordDict({"arrays": merged, "config": config}), n, MessageType.QUERY,
                                      "secagg-advertise") for n in nodes]  # fmt: skip
        keys, claims = self._advertised(grid, messages, "recalibration")
        if len(keys) < self.config.min_sites:
            self.report.recalibration.update({"applied": False, "reason": "fewer replies than min-sites"})
            return
        sub_weights = {n: weights[n] for n in keys}
        layout = statistics_layout(self.engine.template, len(keys))
        outcome = self._secure_sum(grid, keys, "statistics").run(layout, sub_weights)
        total = sum(sub_weights[n][1] for n in outcome.survivors)
        statistics = decode_statistics(outcome.segments, self.engine.template, total)
        self.secure_state.update(statistics)
        for key, tensor in statistics.items():
            merged[key] = numpy_to_array(tensor.numpy())
        self._record_secure(outcome, claims, "statistics")
        self.report.recalibration.update({"applied": True, "sites": [self.secure_sites[n] for n in outcome.survivors]})
        self.report.stop("recalibration-round")

    # ----- before the train round: the weights every site will claim -------------------
    def census(self, grid: Grid, nodes: list[int]) -> None:
        """Ask every site how many images it holds (a scalar, nothing else) before anything is merged.

        The capped shares of count-weighted sums need every claim up front; a site's
        update must then claim the same number, or it is refused.
        """
        self.report.start("census-round")

        def handle(reply: Message, node_id: int) -> None:
            if reply.has_error():
                self.intake.incident(node_id, "", "failed", f"census error code {reply.error.code}")
                return
            try:
                self.intake.claims[node_id] = claimed_examples(reply.content)
            except Exception as exc:  # untrusted reply
                self.intake.incident(node_id, "", "refused", f"census: unreadable reply: {exc}")

        content = RecordDict({"config": ConfigRecord({"phase": "census"})})
        self._stream(grid, [self.make_message(content, n, MessageType.QUERY, "census") for n in nodes], handle)
        self.report.stop("census-round")
        if self.intake.claims:
            self.engine.expect_weights(list(self.intake.claims.values()))
        self.report.census = {str(node): n for node, n in self.intake.claims.items()}

    # ----- second round: statistics under the merged parameters ------------------------
    def _has_bn_to_recalibrate(self) -> bool:
        """False, with a note in the log and the report, for a model without BN layers (e.g. a MiT encoder
        under a head without BN): its statistics pass has nothing to measure, so no round is spent on it."""
        if self.engine.layers:
            return True
        self.report.recalibration.update({"applied": False, "sites": [], "reason": "the model has no BN layers"})
        log.info("recalibration skipped: the model has no BN layers")
        return False

    def recalibrate(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Send the merged model back; pool the sites' BN sums under it into the engine's statistics.

        When enough sites answer, the pooled statistics replace the merged ones in the
        engine and in ``arrays`` (only the BN entries change: no second model is built).
        """
        self.report.start("recalibration-round")
        sites = {s.node_id: s.domain for s in self.report.sites}
        replied: list[str] = []

        def handle(reply: Message, node_id: int) -> None:
            if self.intake.take_sums(reply, node_id, sites.get(node_id, f"node-{node_id}")):
                replied.append(sites.get(node_id, f"node-{node_id}"))

        config = ConfigRecord({"bn-mode": self.config.recalibrate_mode, "phase": "recalibrate"})
        content = RecordDict({"arrays": arrays, "config": config})
        messages = [self.make_message(content, nid, MessageType.QUERY, "recalibrate") for nid in sites]
        self._stream(grid, messages, handle)
        self.report.stop("recalibration-round")
        if len(replied) < self.config.min_sites:
            self.report.recalibration.update(
                {"applied": False, "sites": replied, "reason": "fewer replies than min-sites"}
            )
            log.warning("recalibration skipped: only %d site(s) replied", len(replied))
            return
        for key, tensor in self.engine.apply_recalibration().items():
            arrays[key] = numpy_to_array(tensor.detach().cpu().numpy())
        self.report.recalibration.update({"applied": True, "sites": replied})
