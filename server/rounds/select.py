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

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.bn.bank import BNBank
from common.updates.wire import Action, manifest, numpy_to_array
from server.messages import state_record
from server.rounds.base import Candidate, Round, RunState

__all__ = ["ScoreRound", "SelectRound", "aggregate_scores", "candidate_content", "read_scores"]

log = logging.getLogger(__name__)


def aggregate_scores(values: list[float], how: str) -> float:
    """The worst site's value, or the mean; NaN when no site scored."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return float("nan")
    return min(clean) if how == "worst" else sum(clean) / len(clean)


def candidate_content(model: ArrayRecord, bank: BNBank | None) -> RecordDict:
    """A model to score, with the BN bank it picks its statistics from when it has one."""
    config = ConfigRecord()
    content = RecordDict({"arrays": model, "config": config})
    if bank is not None:
        content["bank"] = ArrayRecord({k: numpy_to_array(v.numpy()) for k, v in bank.tensors().items()})
        config["bank-names"] = list(bank.names)
        config["bank-image-weight"] = bank.image_weight
    return content


def read_scores(reply: Message) -> dict[str, float] | None:
    """The scalar scores of a reply, or None for an error or anything else a hostile site may send."""
    if reply.has_error() or "scores" not in reply.content:
        return None
    record = reply.content["scores"]
    if not isinstance(record, MetricRecord):
        return None
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


class ScoreRound(Round):
    """Every accepted site scores one candidate."""

    name = "score"
    action = Action.SCORE
    timed = False  # the selection round times all its candidates together

    def __init__(self, candidate: Candidate, record: list[dict]) -> None:
        self.candidate, self.record = candidate, record

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        content = candidate_content(state_record(self.candidate.engine.iter_result()), self.candidate.bank())
        return dict.fromkeys(run.sites(), content)

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        scores = read_scores(reply)
        if scores is None:
            return
        self.candidate.scores[node_id] = scores
        self.record.append({"candidate": self.candidate.config.label, "node_id": node_id, "scores": scores,
                            "manifest": manifest(reply.content)})  # fmt: skip


class SelectRound:
    """The label-free selection: the chosen candidate's engine becomes the run's merge."""

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return bool(run.candidates) and not run.config.secure

    def run(self, run: RunState) -> None:
        run.report.start("selection-round")
        record: list[dict] = []
        for candidate in run.candidates:
            ScoreRound(candidate, record).run(run)
        chosen = self.choose(run.candidates, run.config.select_score, run.config.select_aggregate)
        run.engine, run.bank_source = chosen.engine, chosen.config.bank_source
        run.image_weight = chosen.config.image_weight
        run.report.selection = {"score": run.config.select_score, "aggregate": run.config.select_aggregate,
                                "chosen": chosen.config.label, "candidates": [c.config.label for c in run.candidates],
                                "replies": record}  # fmt: skip
        run.report.stop("selection-round")

    @staticmethod
    def choose(candidates: list[Candidate], score: str, how: str) -> Candidate:
        values = [aggregate_scores([s.get(score, math.nan) for s in c.scores.values()], how) for c in candidates]
        usable = [i for i, v in enumerate(values) if math.isfinite(v)]
        if not usable:
            log.warning("label-free selection: no site scored any candidate; keeping the first")
            return candidates[0]
        best = max(usable, key=lambda i: values[i])
        log.info("label-free selection by %s (%s site): %s", score, how, candidates[best].config.label)
        return candidates[best]
