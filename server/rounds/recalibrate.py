"""The second, light round: the merged parameters go back, each site returns BN sums measured under them.

When enough sites answer, the pooled sums replace the merged statistics in the engine
and in the merged record (only the BN entries change: no second model is built). A model
without BN layers (a MiT encoder under a head without BN) has nothing to measure, so no
round is spent on it; the report says so.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, RecordDict

from common.updates.wire import Action, numpy_to_array
from server.rounds.base import Round, RunState

__all__ = ["RecalibrateRound", "has_bn_to_recalibrate"]

log = logging.getLogger(__name__)


def has_bn_to_recalibrate(run: RunState) -> bool:
    """False, with a note in the log and the report, for a model without BN layers."""
    if run.engine.layers:
        return True
    run.report.recalibration.update({"applied": False, "sites": [], "reason": "the model has no BN layers"})
    log.info("recalibration skipped: the model has no BN layers")
    return False


class RecalibrateRound(Round):
    name = "recalibration-round"
    action = Action.RECALIBRATE

    def __init__(self) -> None:
        self.replied: list[str] = []

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return run.config.recalibrate and not run.config.secure and has_bn_to_recalibrate(run)

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        config = ConfigRecord({"bn-mode": run.config.recalibrate_mode})
        return dict.fromkeys(run.sites(), RecordDict({"arrays": run.merged_arrays(), "config": config}))

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        site = run.sites().get(node_id, f"node-{node_id}")
        if run.intake.take_sums(reply, node_id, site):
            self.replied.append(site)

    def finish(self, run: RunState) -> None:
        if len(self.replied) < run.config.min_sites:
            run.report.recalibration.update(
                {"applied": False, "sites": self.replied, "reason": "fewer replies than min-sites"}
            )
            log.warning("recalibration skipped: only %d site(s) replied", len(self.replied))
            return
        merged = run.merged_arrays()
        for key, tensor in run.engine.apply_recalibration().items():
            merged[key] = numpy_to_array(tensor.detach().cpu().numpy())
        run.report.recalibration.update({"applied": True, "sites": self.replied})
