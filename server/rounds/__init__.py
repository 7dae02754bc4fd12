"""The protocol of a one-shot merge, as rounds: each round one module, run in the order of :data:`PLAN`.

A round is a ``configure``/``aggregate`` pair over messages routed by action
(``common.updates.wire.Action``); the strategy runs every entry of the plan whose
``wanted`` says this run needs it. A new round is a new module plus its line here.
"""

from server.rounds.adapt import AdaptRound
from server.rounds.base import Step
from server.rounds.census import CensusRound
from server.rounds.evaluate import EvaluateRound
from server.rounds.recalibrate import RecalibrateRound
from server.rounds.secure import SecureAdaptRound, SecureMerge, SecureRecalibrate
from server.rounds.select import SelectRound

__all__ = ["PLAN"]

PLAN: tuple[type[Step], ...] = (
    CensusRound,  # capped count weights: every claim before the first update is summed
    AdaptRound,  # the one-shot round: adapt, send the update, merged as it streams in
    SelectRound,  # label-free choice among candidate merges
    RecalibrateRound,  # BN statistics under the merged parameters
    SecureAdaptRound,  # secure aggregation: adapt, keep the update, advertise keys
    SecureMerge,  # the merge as one secure sum
    SecureRecalibrate,  # the recalibration as a second secure sum
    EvaluateRound,  # the sites' label-free scores of the final model (an evaluate_config was given)
)
