"""Flower's evaluate round for a one-shot merge: each site scores the final model on its own unlabeled images.

Sites hold no labels, so what they can say about the merged model is label-free: every
score of ``common.scoring.scores.SCORES``, computed on at most 16 of the site's images,
scalars only. The round runs when the strategy is given an ``evaluate_config`` (Flower's
``Strategy.start`` argument), which travels to the sites with the model.
"""

from __future__ import annotations

import statistics

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.updates.wire import Action
from server.rounds.base import Round, RunState
from server.rounds.select import read_scores

__all__ = ["EvaluateRound"]


class EvaluateRound(Round):
    name = "evaluate-round"
    action = Action.EVALUATE

    def __init__(self) -> None:
        self.scores: dict[int, dict[str, float]] = {}

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return run.evaluate_config is not None

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        config = ConfigRecord(dict(run.evaluate_config or {}))
        sites = run.sites() or {n: "" for n in run.secure.survivors}  # a secure run knows only who is in the sum
        return dict.fromkeys(sites, RecordDict({"arrays": run.merged_arrays(), "config": config}))

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        scores = read_scores(reply)
        if scores is None:
            run.intake.incident(node_id, "", "failed", "evaluate: no scores in the reply")
            return
        self.scores[node_id] = scores

    def finish(self, run: RunState) -> None:
        """The mean of each score over the sites that answered, and every site's own values in the report."""
        names = sorted({name for scores in self.scores.values() for name in scores})
        means = {n: statistics.fmean(s[n] for s in self.scores.values() if n in s) for n in names}
        run.evaluate_metrics = MetricRecord({**means, "sites": len(self.scores)})
        run.report.evaluation = {str(node): scores for node, scores in self.scores.items()}
