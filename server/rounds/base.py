"""One round of the protocol: messages out by action, replies in one at a time, and what happens to each.

A round says what each node receives (``configure``) and what one reply does
(``aggregate``); :meth:`Round.run` pushes the messages once and pulls the replies as they
arrive, one id per pull, so the server holds at most one reply besides its sums. A node
silent past the timeout becomes an incident. Every round of a run shares one
:class:`RunState`: the merge being built, the report, and what earlier rounds produced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from common.bn.bank import BNBank
from common.config.run import MergeCandidate
from common.merge.engine import MergeEngine
from server.config import MergeConfig
from server.intake import ReplyIntake
from server.messages import MessageFactory, node_names, state_record
from server.report import MergeReport

__all__ = ["Candidate", "MinSitesNotMet", "Round", "RunState", "SecureState", "Step", "require_min_sites", "stream",
           "wait_for_nodes"]  # fmt: skip

log = logging.getLogger(__name__)


class MinSitesNotMet(RuntimeError):
    """Fewer usable replies than ``min-sites``: the run ends without a merged model."""


@dataclass
class Candidate:
    """A candidate merge and the engine its sums are in."""

    config: MergeCandidate
    engine: MergeEngine
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # node id -> score -> value

    def bank(self) -> BNBank | None:
        source = self.config.bank_source
        return self.engine.bank(source, self.config.image_weight) if source else None


@dataclass
class SecureState:
    """What a secure run learns besides sums: who took part, what each sent in bytes, and the decoded model."""

    sites: dict[int, str] = field(default_factory=dict)  # node id -> the label it reported
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node id -> its two public keys
    claims: dict[int, int] = field(default_factory=dict)  # node id -> images it claimed
    bytes: dict[int, int] = field(default_factory=dict)  # node id -> bytes of its key advertisements
    weights: dict[int, tuple[float, float]] = field(default_factory=dict)  # node id -> (parameter, BN) weight
    survivors: list[int] = field(default_factory=list)  # the nodes in the merge's sum
    state: dict[str, Tensor] | None = None  # the merged model, decoded from the sum


@dataclass
class RunState:
    """What the rounds of one run share."""

    config: MergeConfig
    report: MergeReport
    intake: ReplyIntake
    engine: MergeEngine  # the merge being built; a selection round may replace it by a candidate's
    candidates: list[Candidate]
    make_message: MessageFactory
    bank_source: str  # which BN statistics ship with the merge ("" for none)
    image_weight: float = 0.0  # each test image's share of its own BN statistics in the shipped model
    grid: Grid | None = None
    timeout: float = 0.0
    nodes: list[int] = field(default_factory=list)  # connected when the run started
    initial: ArrayRecord = field(default_factory=ArrayRecord)
    train_config: ConfigRecord = field(default_factory=ConfigRecord)
    evaluate_config: ConfigRecord | None = None
    merged: ArrayRecord | None = None  # the merged model, once the merge is finished
    secure: SecureState = field(default_factory=SecureState)
    evaluate_metrics: MetricRecord | None = None

    def sites(self) -> dict[int, str]:
        """Node id -> site label of every accepted update."""
        return {s.node_id: s.domain for s in self.report.sites}

    def merged_arrays(self) -> ArrayRecord:
        """The merged model as one record, built from the engine's sums the first time it is asked for."""
        if self.merged is None:
            self.report.start("merge-finish")
            self.merged = state_record(self.engine.iter_result())
            self.report.stop("merge-finish")
        return self.merged


class Step(Protocol):
    """An entry of the protocol's plan: a round, or a sequence of rounds with a purpose of its own."""

    @classmethod
    def wanted(cls, run: RunState) -> bool: ...

    def run(self, run: RunState) -> None: ...


class Round:
    """One message round. Subclasses set ``name`` (its timing in the report) and ``action`` (the message type)."""

    name: ClassVar[str]
    action: ClassVar[str]
    timed: ClassVar[bool] = True  # False for the rounds inside a step that times itself

    @classmethod
    def wanted(cls, run: RunState) -> bool:
        return True

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        """What each node receives."""
        raise NotImplementedError

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        """Take one reply (an error reply included); a reply may be hostile, nothing it says may end the run."""
        raise NotImplementedError

    def finish(self, run: RunState) -> None:
        """After every reply arrived or the time ran out."""

    def run(self, run: RunState) -> None:
        if self.timed:
            run.report.start(self.name)
        contents = self.configure(run)
        messages = [run.make_message(content, node, self.action, self.name) for node, content in contents.items()]
        stream(run, messages, lambda reply, node: self.aggregate(run, reply, node))
        if self.timed:
            run.report.stop(self.name)
        self.finish(run)


def stream(run: RunState, messages: list[Message], handle: Callable[[Message, int], object]) -> None:
    """Push once, pull replies as they come, hand each to ``handle``, record the silent ones."""
    assert run.grid is not None
    ids = list(run.grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True) if mid}
    deadline = time.monotonic() + run.timeout
    while pending and time.monotonic() < deadline:
        for message_id in list(pending):
            _pull_one(run.grid, message_id, pending, handle)
        if pending:
            time.sleep(run.config.poll_interval)
    for node_id in pending.values():
        run.intake.incident(node_id, "", "timeout", f"no reply within {run.timeout:.0f}s")


def _pull_one(grid: Grid, message_id: str, pending: dict[str, int], handle: Callable[[Message, int], object]) -> None:
    """Pull and handle the reply to one message, if it is there.

    ``Grid.pull_messages`` inflates every ready reply among the ids it is given, so
    asking for all pending ids at once would hold every reply that arrived meanwhile.
    One id per call, in a function whose locals die on return, keeps one in memory.
    """
    for reply in grid.pull_messages([message_id]):
        node_id = pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        handle(reply, node_id)


def wait_for_nodes(run: RunState) -> list[int]:
    """The connected nodes, once ``min-sites`` are there; MinSitesNotMet when the timeout passes first."""
    assert run.grid is not None
    deadline = time.monotonic() + run.timeout
    while True:
        nodes = sorted(run.grid.get_node_ids())
        if len(nodes) >= run.config.min_sites or time.monotonic() > deadline:
            break
        time.sleep(run.config.poll_interval)
    run.intake.node_names.update(node_names(run.grid))
    if len(nodes) < run.config.min_sites:
        raise MinSitesNotMet(
            f"only {len(nodes)} site(s) connected within {run.timeout:.0f}s, min-sites is {run.config.min_sites}"
        )
    return nodes


def require_min_sites(run: RunState) -> None:
    """After the train round: enough usable updates to merge, or the run ends naming why each failed."""
    accepted = len(run.report.sites)
    if accepted < run.config.min_sites:
        raise MinSitesNotMet(
            f"only {accepted} usable site update(s), min-sites is {run.config.min_sites}: "
            + ("; ".join(f"node {i.node_id} {i.kind}: {i.reason}" for i in run.report.incidents) or "no replies")
        )
