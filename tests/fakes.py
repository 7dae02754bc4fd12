"""Stand-ins for Flower's Message and Grid: a Message cannot be built outside a run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

from flwr.app import RecordDict

from common.merging import SiteUpdate
from common.wire import update_to_records


@dataclass
class FakeReply:
    content: RecordDict
    src_node_id: int = 0
    reply_to: str = ""
    error: SimpleNamespace | None = None

    def has_error(self) -> bool:
        return self.error is not None

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(src_node_id=self.src_node_id, reply_to_message_id=self.reply_to)


def reply_of(update: SiteUpdate, node_id: int = 0) -> FakeReply:
    return FakeReply(update_to_records(update, "adabn"), node_id)


def error_reply(node_id: int, code: int, reason: str) -> FakeReply:
    return FakeReply(RecordDict(), node_id, error=SimpleNamespace(code=code, reason=reason))


def fake_message(content, dst_node_id, message_type, group_id) -> SimpleNamespace:
    """What ``server.strategy`` builds with ``flwr.app.Message`` inside a real run."""
    return SimpleNamespace(
        content=content, message_type=message_type, metadata=SimpleNamespace(dst_node_id=dst_node_id)
    )


@dataclass
class FakeGrid:
    """Answers each pushed message with a prepared reply, arriving in a shuffled order.

    Each ``pull_messages`` call lets time pass: the next ``per_pull`` replies of the
    shuffled queue arrive, and the call returns those of the asked-for ids that have
    arrived. So a strategy that pulls one id at a time still sees the shuffled order.
    """

    replies: dict[int, FakeReply | None]  # node id -> reply (None: never answers)
    per_pull: int = 1
    seed: int = 0
    pushed: list[SimpleNamespace] = field(default_factory=list)
    _queue: list[FakeReply] = field(default_factory=list)
    _arrived: list[FakeReply] = field(default_factory=list)

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> SimpleNamespace:
        return SimpleNamespace(
            content=content, message_type=message_type, metadata=SimpleNamespace(dst_node_id=dst_node_id)
        )

    def push_messages(self, messages) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            self.pushed.append(msg)
            mid = f"m{len(self.pushed)}-{i}"
            reply = self.replies[msg.metadata.dst_node_id]
            if reply is not None:
                reply.reply_to, reply.src_node_id = mid, msg.metadata.dst_node_id
                self._queue.append(reply)
            ids.append(mid)
        random.Random(self.seed).shuffle(self._queue)
        return ids

    def pull_messages(self, message_ids) -> list[FakeReply]:
        self._arrived += self._queue[: self.per_pull]
        del self._queue[: self.per_pull]
        wanted = set(message_ids)
        ready = [r for r in self._arrived if r.reply_to in wanted]
        for r in ready:
            self._arrived.remove(r)
        return ready
