"""Before the train round, when capped count weights are asked for: how many images each site holds.

The capped shares of count-weighted sums need every claim up front; a site's update must
then claim the same number, or it is refused. Only a scalar comes back.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from common.updates.wire import Action, claimed_examples
from server.rounds.base import Round, RunState

__all__ = ["CensusRound"]


class CensusRound(Round):
    name = "census-round"
    action = Action.CENSUS

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        spec = run.config.spec
        return not run.config.secure and spec.weighting != "uniform" and spec.max_share < 1.0

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        return dict.fromkeys(run.nodes, RecordDict({"config": ConfigRecord()}))

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        if reply.has_error():
            run.intake.incident(node_id, "", "failed", f"census error code {reply.error.code}")
            return
        try:
            run.intake.claims[node_id] = claimed_examples(reply.content)
        except Exception as exc:  # untrusted reply
            run.intake.incident(node_id, "", "refused", f"census: unreadable reply: {exc}")

    def finish(self, run: RunState) -> None:
        if run.intake.claims:
            run.engine.expect_weights(list(run.intake.claims.values()))
        run.report.census = {str(node): n for node, n in run.intake.claims.items()}
