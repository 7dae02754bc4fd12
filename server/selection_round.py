"""Choosing the merge without labels: every candidate goes to the sites, only scalar scores come back.

While the updates stream in, each is folded into one engine per candidate merge (the
candidates differ in method, BN rule, weights or BN bank). Then, one candidate at a time
(so a site holds at most its own model and the candidate), every site scores the
candidate on its own unlabeled images (``common.scoring.label_free``) and answers with scalars
alone. The server keeps the candidate whose worst (or mean) site score is highest and
records every score, so the choice can be audited.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.bn.bank import BNBank
from common.config.run import MergeCandidate
from common.merge.engine import MergeEngine
from common.updates.wire import manifest, numpy_to_array

__all__ = ["Candidate", "SelectionRound", "aggregate_scores"]

log = logging.getLogger(__name__)
Stream = Callable[[Grid, list[Message], Callable[[Message, int], object]], None]
Factory = Callable[[RecordDict, int, str, str], Message]


@dataclass
class Candidate:
    """A candidate merge and the engine its sums are in."""

    config: MergeCandidate
    engine: MergeEngine
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # node id -> score -> value

    def bank(self) -> BNBank | None:
        return self.engine.bank(self.config.bn_bank) if self.config.bn_bank else None


def aggregate_scores(values: list[float], how: str) -> float:
    """The worst site's value, or the mean; NaN when no site scored."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return float("nan")
    return min(clean) if how == "worst" else sum(clean) / len(clean)


def _candidate_content(candidate: Candidate) -> RecordDict:
    arrays = ArrayRecord()
    for key, tensor in candidate.engine.iter_result():
        arrays[key] = numpy_to_array(tensor.detach().cpu().numpy())
    config = ConfigRecord({"phase": "score"})
    content = RecordDict({"arrays": arrays, "config": config})
    bank = candidate.bank()
    if bank is not None:
        content["bank"] = ArrayRecord({k: numpy_to_array(v.numpy()) for k, v in bank.tensors().items()})
        config["bank-names"] = list(bank.names)
    return content


@dataclass
class SelectionRound:
    grid: Grid
    stream: Stream
    make_message: Factory
    score: str
    how: str
    record: list[dict] = field(default_factory=list)  # what each site sent back, for the report

    def run(self, candidates: list[Candidate], nodes: list[int]) -> Candidate:
        for candidate in candidates:
            self._score(candidate, nodes)
        values = [aggregate_scores([s.get(self.score, math.nan) for s in c.scores.values()], self.how)
                  for c in candidates]  # fmt: skip
        usable = [i for i, v in enumerate(values) if math.isfinite(v)]
        if not usable:
            log.warning("label-free selection: no site scored any candidate; keeping the first")
            return candidates[0]
        best = max(usable, key=lambda i: values[i])
        log.info("label-free selection by %s (%s site): %s", self.score, self.how, candidates[best].config.label)
        return candidates[best]

    def _score(self, candidate: Candidate, nodes: list[int]) -> None:
        content = _candidate_content(candidate)

        def handle(reply: Message, node_id: int) -> None:
            if reply.has_error() or "scores" not in reply.content:
                return
            record = reply.content["scores"]
            if not isinstance(record, MetricRecord):
                return
            candidate.scores[node_id] = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
            self.record.append({"candidate": candidate.config.label, "node_id": node_id,
                                "scores": candidate.scores[node_id], "manifest": manifest(reply.content)})  # fmt: skip

        messages = [self.make_message(content, node, MessageType.QUERY, "score") for node in nodes]
        self.stream(self.grid, messages, handle)
