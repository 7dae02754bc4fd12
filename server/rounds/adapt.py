"""The one-shot round: the shared start goes out, each site adapts, and each update is merged as it arrives."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.updates.wire import Action
from server.rounds.base import Round, RunState, require_min_sites

__all__ = ["AdaptRound", "train_content"]


def train_content(arrays: ArrayRecord, config: ConfigRecord, server_round: int, **flags: bool) -> RecordDict:
    """What a train message carries: the model, the run's train config, the round, and the run's flags."""
    return RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), "server-round": server_round,
                                                                 **flags})})  # fmt: skip


class AdaptRound(Round):
    name = "train-round"
    action = Action.ADAPT

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return not run.config.secure

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        run.report.timings["train-round-started-at"] = time.time()
        flags = {"keep-own": True} if run.candidates else {}  # a selection round scores candidates against it
        content = train_content(run.initial, run.train_config, 1, **flags)
        return dict.fromkeys(run.nodes, content)

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        run.intake.take_update(reply, node_id)

    def finish(self, run: RunState) -> None:
        require_min_sites(run)
