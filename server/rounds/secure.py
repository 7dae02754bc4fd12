"""The one-shot merge under secure aggregation: the same merge, while the server learns only sums.

The train round's sites adapt and keep their update, answering with public keys and their
image count; the merge is one secure sum of their weighted vectors (``common.secure.layout``);
the recalibration, when asked for, a second secure sum of their BN moments under the merged
model. See ``server.rounds.secure_sum`` for the sum's own steps and what a drop-out does.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from common.merge.bn_pooling import capped_shares
from common.secure.layout import decode_merge, decode_statistics, merge_layout, statistics_layout
from common.updates.site import site_label
from common.updates.wire import Action, claimed_examples, numpy_to_array, wire_bytes
from server.messages import state_record
from server.report import SiteEntry
from server.rounds.adapt import train_content
from server.rounds.base import MinSitesNotMet, Round, RunState
from server.rounds.recalibrate import has_bn_to_recalibrate
from server.rounds.secure_sum import SecureOutcome, SecureSum, threshold_for

__all__ = ["SecureAdaptRound", "SecureMerge", "SecureRecalibrate"]


class _Advertise(Round):
    """A round whose sites answer with public keys and an image count; the keys of those that did."""

    def __init__(self) -> None:
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.claims: dict[int, int] = {}

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        if reply.has_error():
            run.intake.incident(node_id, "", "failed", f"secure {self.name}: error code {reply.error.code}: "
                                f"{reply.error.reason}")  # fmt: skip
            return
        run.secure.bytes[node_id] = run.secure.bytes.get(node_id, 0) + wire_bytes(reply.content)
        try:
            record = reply.content["keys"]
            self.keys[node_id] = (bytes(record["share-public"]), bytes(record["mask-public"]))
            self.claims[node_id] = claimed_examples(reply.content)
            run.secure.sites[node_id] = site_label(reply.content["info"].get("domain", ""), f"node-{node_id}")
        except Exception as exc:  # untrusted reply
            self.keys.pop(node_id, None)
            self.claims.pop(node_id, None)
            run.intake.incident(node_id, "", "refused", f"secure {self.name}: unreadable reply: {exc}")


class SecureAdaptRound(_Advertise):
    """The train round of a secure run: each site adapts, keeps its update, and advertises its keys."""

    name = "train-round"
    action = Action.ADAPT

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return run.config.secure

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        run.report.timings["train-round-started-at"] = time.time()
        return dict.fromkeys(run.nodes, train_content(run.initial, run.train_config, 1, secure=True))

    def finish(self, run: RunState) -> None:
        if len(self.keys) < run.config.min_sites:
            raise MinSitesNotMet(f"only {len(self.keys)} site(s) adapted and advertised keys, min-sites is "
                                 f"{run.config.min_sites}")  # fmt: skip
        run.secure.claims = dict(self.claims)
        run.secure.weights = _weights(run, self.claims)
        run.secure.keys = self.keys


def _weights(run: RunState, claims: dict[int, int]) -> dict[int, tuple[float, float]]:
    """(parameter, statistics) weight of each site: 1, or its capped share of the claimed images."""
    nodes = sorted(claims)
    spec = run.config.spec
    shares = capped_shares(np.array([float(claims[n]) for n in nodes]), spec.max_share)
    return {
        n: (float(s) if spec.weighting == "counts" else 1.0, 1.0 if spec.equal_site_stats else float(s))
        for n, s in zip(nodes, shares, strict=True)
    }


def _record(run: RunState, outcome: SecureOutcome, summed: SecureSum, kind: str) -> None:
    """Who dropped out when, and (for the merge) which sites are in it, with what they sent."""
    for node, reason in summed.incidents:
        run.intake.incident(node, run.secure.sites.get(node, ""), "failed", reason)
    for node in outcome.dropped_before_input:
        run.intake.incident(node, run.secure.sites.get(node, ""), "failed",
                            f"secure {kind}: dropped out before sending its masked vector")  # fmt: skip
    for node in outcome.dropped_after_input:
        reason = f"secure {kind}: sent its masked vector, then dropped out (still in the sum)"
        run.intake.incident(node, run.secure.sites.get(node, ""), "dropout", reason)
    if kind == "merge":
        for node in outcome.survivors:
            sent = outcome.bytes_received.get(node, 0) + run.secure.bytes.get(node, 0)
            run.report.sites.append(SiteEntry(run.secure.sites[node], node, run.secure.claims[node], 0, sent))
    run.report.secure[kind] = {"survivors": outcome.survivors, "threshold": summed.threshold,
                               "relative_error_bound": outcome.relative_error}  # fmt: skip


class SecureMerge:
    """The merge as one secure sum of the advertised sites' weighted vectors."""

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return run.config.secure

    def run(self, run: RunState) -> None:
        run.report.start("secure-sum")
        keys, weights = run.secure.keys, run.secure.weights
        summed = SecureSum(keys, threshold_for(len(keys), run.config.min_sites), "merge")
        outcome = summed.run(run, merge_layout(run.engine.template, len(keys)), weights)
        run.report.stop("secure-sum")
        totals = [sum(weights[n][i] for n in outcome.survivors) for i in (0, 1)]
        run.secure.state = decode_merge(outcome.segments, run.engine.template, *totals)
        run.secure.survivors = outcome.survivors
        run.merged = state_record(run.secure.state.items())
        _record(run, outcome, summed, "merge")


class _AdvertiseStatistics(_Advertise):
    name = "recalibration"
    action = Action.SECAGG_ADVERTISE
    timed = False

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        config = ConfigRecord({"sum": "statistics", "bn-mode": run.config.recalibrate_mode})
        return dict.fromkeys(run.secure.survivors, RecordDict({"arrays": run.merged_arrays(), "config": config}))


class SecureRecalibrate:
    """The recalibration round as a second secure sum of the sites' BN moments under the merged model."""

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return run.config.secure and run.config.recalibrate and has_bn_to_recalibrate(run)

    def run(self, run: RunState) -> None:
        run.report.start("recalibration-round")
        advertised = _AdvertiseStatistics()
        advertised.run(run)
        if len(advertised.keys) < run.config.min_sites:
            run.report.recalibration.update({"applied": False, "reason": "fewer replies than min-sites"})
            run.report.stop("recalibration-round")
            return
        weights = {n: run.secure.weights[n] for n in advertised.keys}
        summed = SecureSum(advertised.keys, threshold_for(len(advertised.keys), run.config.min_sites), "statistics")
        outcome = summed.run(run, statistics_layout(run.engine.template, len(advertised.keys)), weights)
        total = sum(weights[n][1] for n in outcome.survivors)
        statistics = decode_statistics(outcome.segments, run.engine.template, total)
        assert run.secure.state is not None and run.merged is not None
        run.secure.state.update(statistics)
        for key, tensor in statistics.items():
            run.merged[key] = numpy_to_array(tensor.numpy())
        _record(run, outcome, summed, "statistics")
        sites = [run.secure.sites[n] for n in outcome.survivors]
        run.report.recalibration.update({"applied": True, "sites": sites})
        run.report.stop("recalibration-round")
