"""The one-shot merge strategy: Flower's ``Strategy`` contract over the protocol's rounds (``server.rounds``).

Flower's stock strategies collect every reply before aggregating, so server memory grows
with the number of sites. Here messages are pushed once and replies pulled one at a time
as they come; each goes through :class:`~server.intake.ReplyIntake` into the merge engine
and is dropped before the next is pulled, so the server holds the sums and at most one
reply. Which rounds a run has (census, train, label-free selection, recalibration, the
secure sums, evaluation) is the plan's business; the maths is ``common.merge.engine``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from common.bn.stats import CountProfile
from common.merge.engine import MergeEngine
from common.updates.site import SiteUpdate
from common.updates.wire import Action
from server.config import MergeConfig
from server.intake import ReplyIntake
from server.messages import MessageFactory, claimed_weight, flower_message
from server.report import MergeReport
from server.rounds import PLAN
from server.rounds.adapt import train_content
from server.rounds.base import Candidate, RunState, require_min_sites, wait_for_nodes

__all__ = ["OneShotMerge"]

log = logging.getLogger(__name__)


class OneShotMerge(Strategy):
    """Merge every site once by the run's merge spec, in the rounds the run's config asks for."""

    def __init__(
        self,
        config: MergeConfig,
        template: Mapping[str, Tensor],
        report: MergeReport | None = None,
        on_update: Callable[[SiteUpdate, int], None] | None = None,
        make_message: MessageFactory = flower_message,
        profile: CountProfile | None = None,
        result_arrays: bool = True,
    ) -> None:
        """``result_arrays = False``: ``start``'s Result carries the merged model only if a round built it anyway
        (a caller that writes the merge from ``engine`` tensor by tensor, as the ServerApp does, needs no copy)."""
        self.config = config
        self.result_arrays = result_arrays
        engine = MergeEngine(config.spec, template, profile)
        candidates = [  # a label-free selection's candidate merges, one engine each (shared when specs agree)
            Candidate(c, engine if c.spec == config.spec else MergeEngine(c.spec, template, profile))
            for c in config.candidates
        ]
        report = report or MergeReport()
        intake = ReplyIntake(engine, report, on_update=_fan_out(engine, candidates, on_update))
        self.state = RunState(config, report, intake, engine, candidates, make_message, config.bank_source,
                              image_weight=config.bn_image_weight, timeout=config.timeout)  # fmt: skip

    @property
    def report(self) -> MergeReport:
        return self.state.report

    @property
    def engine(self) -> MergeEngine:
        """The run's merge: the configured one, or the candidate a label-free selection chose."""
        return self.state.engine

    @property
    def intake(self) -> ReplyIntake:
        return self.state.intake

    @property
    def bank_source(self) -> str:
        """Which BN statistics ship with the merge ("" for none)."""
        return self.state.bank_source

    @property
    def image_weight(self) -> float:
        """Each test image's share of its own BN statistics in the shipped model (0: off)."""
        return self.state.image_weight

    @property
    def secure_state(self) -> dict[str, Tensor] | None:
        """The merged model of a secure run: only the sum was ever seen."""
        return self.state.secure.state

    def summary(self) -> None:
        """The run's merge in the shape of Flower's own strategy summaries (``MergeConfig.summary``)."""
        lines = self.config.summary()
        log.info("OneShotMerge settings:")
        for i, line in enumerate(lines):
            log.info("\t%s── %s", "└" if i == len(lines) - 1 else "├", line)

    # ----- Flower's Strategy contract ---------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.state.grid = grid
        content = train_content(arrays, config, server_round)
        nodes = wait_for_nodes(self.state)
        return [self.state.make_message(content, n, Action.ADAPT, str(server_round)) for n in nodes]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # Flower's own loop hands them all at once
        if self.config.spec.weighting != "uniform" and self.config.spec.max_share < 1.0:
            self.engine.expect_weights([n for n in (claimed_weight(r) for r in replies) if n is not None])
        for reply in replies:
            self.intake.take_update(reply, reply.metadata.src_node_id)
        return self.finish()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # the evaluate round runs inside start, when an evaluate_config is given

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def finish(self) -> tuple[ArrayRecord, MetricRecord]:
        """The merged model and how many sites and images are in it; MinSitesNotMet if too few."""
        return self.state.merged_arrays(), self._metrics()

    def _metrics(self) -> MetricRecord:
        require_min_sites(self.state)
        sites = self.report.sites
        return MetricRecord({"sites": len(sites), "num-examples": sum(s.num_examples for s in sites)})

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
        """The plan's rounds, each waiting up to ``timeout`` seconds (default: the run config's); one merge."""
        if num_rounds != 1:
            raise ValueError("OneShotMerge merges once: num_rounds must be 1")
        self.summary()
        run = self.state
        run.grid, run.initial = grid, initial_arrays
        run.timeout = self.config.timeout if timeout is None else float(timeout)
        run.train_config = train_config or ConfigRecord()
        run.evaluate_config = evaluate_config
        run.nodes = wait_for_nodes(run)
        for step in PLAN:
            if step.wanted(run):
                step().run(run)
        result = Result()
        if not run.config.secure:
            result.train_metrics_clientapp[1] = self._metrics()
        if self.result_arrays or run.merged is not None or evaluate_fn is not None:
            result.arrays = run.merged_arrays()
        if run.evaluate_metrics is not None:
            result.evaluate_metrics_clientapp[1] = run.evaluate_metrics
        if evaluate_fn is not None and (res := evaluate_fn(1, result.arrays)) is not None:
            result.evaluate_metrics_serverapp[1] = res
        return result


def _fan_out(
    engine: MergeEngine, candidates: list[Candidate], on_update: Callable[[SiteUpdate, int], None] | None
) -> Callable[[SiteUpdate, int], None] | None:
    """After an update entered the main engine: into every other candidate's engine, then ``on_update``."""
    if not candidates:
        return on_update

    def handle(update: SiteUpdate, node_id: int) -> None:
        for candidate in candidates:
            if candidate.engine is not engine:
                candidate.engine.ingest(update)
        if on_update is not None:
            on_update(update, node_id)

    return handle
