"""One reply in, one outcome recorded: the step every server strategy shares.

A reply is untrusted input. Decoding it, checking it and folding it into the merge
engine either succeeds, and the site is recorded with what it sent, or fails in any
way at all, and the failure becomes an incident naming the node and the site while the
sums stay as they were. Nothing a reply says can end the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import Message

from common.merge.engine import MergeEngine, Refused
from common.updates.site import SiteUpdate
from common.updates.wire import manifest, records_to_sums, records_to_update, wire_bytes
from server.report import Incident, MergeReport, SiteEntry

__all__ = ["ReplyIntake"]

log = logging.getLogger(__name__)


class ReplyIntake:
    """Takes replies into ``engine`` and records each outcome in ``report``."""

    def __init__(
        self,
        engine: MergeEngine,
        report: MergeReport,
        node_names: dict[int, str] | None = None,
        on_update: Callable[[SiteUpdate, int], None] | None = None,
        label: str = "",
    ) -> None:
        self.engine, self.report = engine, report
        self.node_names = node_names if node_names is not None else {}
        self.on_update = on_update
        self.label = label  # e.g. "round 2: ", prefixed to incident reasons
        self.claims: dict[int, int] = {}  # node id -> images it claimed in a census round, when there was one

    def incident(self, node_id: int, site: str, kind: str, reason: str) -> None:
        name = self.node_names.get(node_id, "")
        log.warning("site %s (node %s %s) %s: %s", site or "?", node_id, name, kind, reason)
        self.report.incidents.append(Incident(node_id, site, kind, self.label + reason, name))

    def _failed(self, reply: Message, node_id: int, what: str) -> bool:
        if reply.has_error():
            self.incident(node_id, "", "failed", f"{what}error code {reply.error.code}: {reply.error.reason}")
            return True
        return False

    def take_update(self, reply: Message, node_id: int, weight: float | None = None) -> bool:
        """Fold a training reply into the merge; False (with an incident) if it did not enter."""
        received_at = time.time()
        if self._failed(reply, node_id, ""):
            return False
        try:
            update = records_to_update(reply.content, fallback_site=f"node-{node_id}")
        except Exception as exc:  # a hostile reply may break decoding in any way; none may stop the run
            self.incident(node_id, "", "refused", f"unreadable reply: {type(exc).__name__}: {exc}")
            return False
        claimed = self.claims.get(node_id)
        if claimed is not None and update.num_examples != claimed:
            reason = f"claims {update.num_examples} images, {claimed} in the census"
            self.incident(node_id, update.site, "refused", reason)
            return False
        outcome = self.engine.ingest(update, weight)
        if isinstance(outcome, Refused):
            self.incident(node_id, update.site, "refused", outcome.reason)
            return False
        entry = SiteEntry(
            outcome.site, node_id, outcome.num_examples, outcome.bn_values, wire_bytes(reply.content),
            update.metrics, manifest(reply.content), self.node_names.get(node_id, ""), outcome.weight,
            outcome.clip_scale,
        )  # fmt: skip
        entry.metrics["server-received-at"] = received_at
        self.report.sites.append(entry)
        log.info("merged site %s (node %s, %d images)", update.site, node_id, update.num_examples)
        if self.on_update is not None:
            self.on_update(update, node_id)
        return True

    def take_sums(self, reply: Message, node_id: int, site: str) -> bool:
        """Pool a recalibration reply's BN sums; False (with an incident) if they did not enter."""
        if self._failed(reply, node_id, "recalibration "):
            return False
        try:
            sums = records_to_sums(reply.content)
        except Exception as exc:  # as above: decoding untrusted bytes
            self.incident(node_id, site, "refused", f"recalibration: unreadable reply: {type(exc).__name__}: {exc}")
            return False
        refused = self.engine.pool_sums(site, sums)
        if refused is not None:
            self.incident(node_id, site, "refused", f"recalibration: {refused.reason}")
            return False
        self.report.recalibration.setdefault("bytes", {})[str(node_id)] = wire_bytes(reply.content)
        return True
