"""The server's side of a secure sum: three message rounds after the keys are advertised, then only the sum.

1. advertise (before this module): each site answers with two public keys and its number of
   images (the train round does this after adapting; the recalibration asks again);
2. share keys: every participant's public keys go out; each site answers with one encrypted
   Shamir share per participant, which the server only forwards;
3. masked input: each site receives the shares addressed to it, its weights and the agreed
   fixed-point layout, and answers with its masked vector; the server adds the vectors up
   as they arrive (modulo 2^64) and drops each;
4. unmask: the survivors receive who sent a vector and who vanished before; with the shares
   of at least ``threshold`` of them the server removes the masks and decodes the sum.

A site that vanishes after step 3 is still in the sum; one that vanishes before it is left
out, and its masks removed. Fewer than ``threshold`` answers at any step end the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from common.secure.secagg import SecureLayout, decode_sum, unmask
from common.updates.wire import Action, wire_bytes
from server.rounds.base import Round, RunState

__all__ = ["SecureOutcome", "SecureSum", "SecureSumFailed", "threshold_for"]


class SecureSumFailed(RuntimeError):
    """Too few sites answered a step of the secure sum for it to be completed."""


def threshold_for(sites: int, min_sites: int) -> int:
    """Shares needed to unmask: a majority, and never fewer than ``min-sites`` (or 2)."""
    return min(sites, max(2, min_sites, sites // 2 + 1))


@dataclass
class SecureOutcome:
    """What the server learns: the decoded sum of the sites in ``survivors``, nothing per site."""

    segments: list[np.ndarray]
    survivors: list[int]
    dropped_before_input: list[int]
    dropped_after_input: list[int]
    bytes_received: dict[int, int] = field(default_factory=dict)
    relative_error: float = 0.0  # the decoding error's bound, as a share of each segment's agreed bound


@dataclass
class _Step(Round):
    """A step of one secure sum: its replies by node, their bytes, and the incidents on the way."""

    sum: SecureSum
    replies: dict[int, RecordDict] = field(default_factory=dict)
    timed = False  # the secure sum is timed as a whole

    def aggregate(self, run: RunState, reply: Message, node_id: int) -> None:
        if reply.has_error():
            self.sum.incidents.append((node_id, f"secure sum, {self.name}: error code {reply.error.code}"))
            return
        self.sum.bytes_received[node_id] = self.sum.bytes_received.get(node_id, 0) + wire_bytes(reply.content)
        self.take(node_id, reply.content)

    def take(self, node_id: int, content: RecordDict) -> None:
        self.replies[node_id] = content


@dataclass
class _ShareKeys(_Step):
    name = "share-keys"
    action = Action.SECAGG_SHARE_KEYS

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        keys = self.sum.keys
        public = {f"share-public:{n}": keys[n][0] for n in keys}
        public.update({f"mask-public:{n}": keys[n][1] for n in keys})
        config = ConfigRecord({**public, "threshold": self.sum.threshold, "sum": self.sum.kind})
        return dict.fromkeys(sorted(keys), RecordDict({"config": config}))

    def shares(self) -> dict[int, dict[int, bytes]]:
        """Each sender's shares by addressee; a site whose shares do not address every participant is left out."""
        out = {}
        for node, content in self.replies.items():
            addressed = {int(k[3:]): bytes(v) for k, v in content["shares"].items() if k.startswith("to:")}
            if set(addressed) == set(self.sum.keys):
                out[node] = addressed
            else:
                self.sum.incidents.append((node, "secure sum: shares not addressed to every participant"))
        return out


@dataclass
class _MaskedInput(_Step):
    name = "masked-input"
    action = Action.SECAGG_MASKED_INPUT
    shares: Mapping[int, Mapping[int, bytes]] = field(default_factory=dict)
    layout: SecureLayout | None = None
    weights: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    total: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        assert self.layout is not None
        senders = sorted(self.shares)
        self.total = np.zeros(self.layout.length, dtype=np.uint64)
        base = {"layout-names": list(self.layout.names), "layout-sizes": list(self.layout.sizes),
                "layout-scales": list(self.layout.scales), "layout-room": self.layout.room, "participants": senders,
                "sum": self.sum.kind}  # fmt: skip
        out = {}
        for node in senders:
            addressed = {f"from:{src}": self.shares[src][node] for src in senders}
            param_weight, stats_weight = self.weights[node]
            out[node] = RecordDict({"config": ConfigRecord({**base, **addressed, "param-weight": param_weight,
                                                            "stats-weight": stats_weight})})  # fmt: skip
        return out

    def take(self, node_id: int, content: RecordDict) -> None:
        assert self.layout is not None
        try:
            masked = content["masked"]["y"].numpy()
            if masked.dtype != np.uint64 or masked.shape != (self.layout.length,):
                raise ValueError(f"a {masked.dtype} vector of shape {masked.shape}")
        except Exception as exc:  # an untrusted reply: refused, the sum untouched
            self.sum.incidents.append((node_id, f"secure sum, masked input refused: {exc}"))
            return
        self.total += masked
        self.replies[node_id] = RecordDict()  # only who sent a vector is kept, never the vector


@dataclass
class _Unmask(_Step):
    name = "unmask"
    action = Action.SECAGG_UNMASK
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def configure(self, run: RunState) -> dict[int, RecordDict]:
        config = ConfigRecord({"survivors": self.survivors, "dropped": self.dropped, "sum": self.sum.kind})
        return dict.fromkeys(self.survivors, RecordDict({"config": config}))


@dataclass
class SecureSum:
    """One secure sum over the sites that advertised ``keys`` (node id -> (share public, mask public))."""

    keys: dict[int, tuple[bytes, bytes]]
    threshold: int
    kind: str  # "merge" or "statistics": which vector the sites build
    bytes_received: dict[int, int] = field(default_factory=dict)
    incidents: list[tuple[int, str]] = field(default_factory=list)

    def _require(self, nodes: list[int], phase: str) -> None:
        if len(nodes) < self.threshold:
            raise SecureSumFailed(f"secure sum, {phase}: {len(nodes)} site(s) left, {self.threshold} needed to unmask")

    def run(self, run: RunState, layout: SecureLayout, weights: Mapping[int, tuple[float, float]]) -> SecureOutcome:
        """Steps 2 to 4; ``weights`` gives each site its (parameter, statistics) weight."""
        participants = sorted(self.keys)
        self._require(participants, "start")
        share_keys = _ShareKeys(self)
        share_keys.run(run)
        shares = share_keys.shares()
        senders = sorted(shares)
        self._require(senders, "share keys")
        masked = _MaskedInput(self, shares=shares, layout=layout, weights=weights)
        masked.run(run)
        survivors = sorted(masked.replies)
        self._require(survivors, "masked input")
        dropped = [n for n in senders if n not in survivors]
        answers = _Unmask(self, survivors=survivors, dropped=dropped)
        answers.run(run)
        self._require(sorted(answers.replies), "unmask")
        seed_shares = {n: [bytes(a["shares"][f"seed:{n}"]) for a in answers.replies.values()] for n in survivors}
        key_shares = {n: [bytes(a["shares"][f"key:{n}"]) for a in answers.replies.values()] for n in dropped}
        mask_public = {n: self.keys[n][1] for n in senders}
        unmasked = unmask(masked.total, survivors, dropped, seed_shares, key_shares, mask_public)
        late = [n for n in survivors if n not in answers.replies]
        before = [n for n in participants if n not in senders] + dropped
        segments = decode_sum(unmasked, layout)
        error = layout.relative_error_bound(len(survivors))
        return SecureOutcome(segments, survivors, before, late, dict(self.bytes_received), error)
