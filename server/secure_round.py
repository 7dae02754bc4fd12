"""The server's side of a secure sum: four message rounds, after which it holds only the sum.

1. advertise: each site answers with two public keys and its number of images (the first
   round's train message does this after adapting; the recalibration round asks again);
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

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.secure.secagg import SecureLayout, decode_sum, unmask
from common.updates.wire import wire_bytes

__all__ = ["SecureOutcome", "SecureSum", "threshold_for"]

log = logging.getLogger(__name__)
Stream = Callable[[Grid, list[Message], Callable[[Message, int], object]], None]
Factory = Callable[[RecordDict, int, str, str], Message]


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
class SecureSum:
    """One secure sum over the sites that advertised ``keys`` (node id -> (share public, mask public))."""

    grid: Grid
    stream: Stream
    make_message: Factory
    keys: dict[int, tuple[bytes, bytes]]
    threshold: int
    kind: str  # "merge" or "statistics": which vector the sites build
    bytes_received: dict[int, int] = field(default_factory=dict)
    incidents: list[tuple[int, str]] = field(default_factory=list)

    def _round(self, phase: str, contents: Mapping[int, ConfigRecord]) -> dict[int, RecordDict]:
        replies: dict[int, RecordDict] = {}

        def handle(reply: Message, node_id: int) -> None:
            if reply.has_error():
                self.incidents.append((node_id, f"secure sum, {phase}: error code {reply.error.code}"))
                return
            self.bytes_received[node_id] = self.bytes_received.get(node_id, 0) + wire_bytes(reply.content)
            replies[node_id] = reply.content

        messages = [
            self.make_message(RecordDict({"config": _with_phase(config, phase)}), node, MessageType.QUERY,
                              f"secagg-{phase}")
            for node, config in contents.items()
        ]  # fmt: skip
        self.stream(self.grid, messages, handle)
        return replies

    def _require(self, nodes: list[int], phase: str) -> None:
        if len(nodes) < self.threshold:
            raise SecureSumFailed(f"secure sum, {phase}: {len(nodes)} site(s) left, {self.threshold} needed to unmask")

    def run(self, layout: SecureLayout, weights: Mapping[int, tuple[float, float]]) -> SecureOutcome:
        """Steps 2 to 4; ``weights`` gives each site its (parameter, statistics) weight."""
        participants = sorted(self.keys)
        self._require(participants, "start")
        shares = self._share_keys(participants)
        senders = sorted(shares)
        self._require(senders, "share keys")
        total, survivors = self._masked_input(senders, shares, layout, weights)
        self._require(survivors, "masked input")
        dropped = [n for n in senders if n not in survivors]
        answers = self._round("unmask", {n: ConfigRecord({"survivors": survivors, "dropped": dropped,
                                                          "sum": self.kind}) for n in survivors})  # fmt: skip
        self._require(sorted(answers), "unmask")
        seed_shares = {n: [bytes(a["shares"][f"seed:{n}"]) for a in answers.values()] for n in survivors}
        key_shares = {n: [bytes(a["shares"][f"key:{n}"]) for a in answers.values()] for n in dropped}
        mask_public = {n: self.keys[n][1] for n in senders}
        unmasked = unmask(total, survivors, dropped, seed_shares, key_shares, mask_public)
        late = [n for n in survivors if n not in answers]
        before = [n for n in participants if n not in senders] + dropped
        segments = decode_sum(unmasked, layout)
        error = layout.relative_error_bound(len(survivors))
        return SecureOutcome(segments, survivors, before, late, dict(self.bytes_received), error)

    def _share_keys(self, participants: list[int]) -> dict[int, dict[int, bytes]]:
        public = {f"share-public:{n}": self.keys[n][0] for n in participants}
        public.update({f"mask-public:{n}": self.keys[n][1] for n in participants})
        config = ConfigRecord({**public, "threshold": self.threshold, "sum": self.kind})
        replies = self._round("share-keys", {n: config for n in participants})
        out = {}
        for node, content in replies.items():
            record = content["shares"]
            addressed = {int(k[3:]): bytes(v) for k, v in record.items() if k.startswith("to:")}
            if set(addressed) == set(participants):
                out[node] = addressed
            else:
                self.incidents.append((node, "secure sum: shares not addressed to every participant"))
        return out

    def _masked_input(
        self,
        senders: list[int],
        shares: Mapping[int, Mapping[int, bytes]],
        layout: SecureLayout,
        weights: Mapping[int, tuple[float, float]],
    ) -> tuple[np.ndarray, list[int]]:
        total = np.zeros(layout.length, dtype=np.uint64)
        survivors: list[int] = []
        base = {"layout-names": list(layout.names), "layout-sizes": list(layout.sizes),
                "layout-scales": list(layout.scales), "layout-room": layout.room, "participants": senders,
                "sum": self.kind}  # fmt: skip
        contents = {}
        for node in senders:
            addressed = {f"from:{src}": shares[src][node] for src in senders}
            param_weight, stats_weight = weights[node]
            contents[node] = ConfigRecord({**base, **addressed, "param-weight": param_weight,
                                           "stats-weight": stats_weight})  # fmt: skip

        def handle(reply: Message, node_id: int) -> None:
            nonlocal total
            if reply.has_error():
                self.incidents.append((node_id, f"secure sum, masked input: error code {reply.error.code}"))
                return
            try:
                masked = reply.content["masked"]["y"].numpy()
                if masked.dtype != np.uint64 or masked.shape != (layout.length,):
                    raise ValueError(f"a {masked.dtype} vector of shape {masked.shape}")
            except Exception as exc:  # an untrusted reply: refused, the sum untouched
                self.incidents.append((node_id, f"secure sum, masked input refused: {exc}"))
                return
            total += masked
            survivors.append(node_id)
            self.bytes_received[node_id] = self.bytes_received.get(node_id, 0) + wire_bytes(reply.content)

        messages = [
            self.make_message(RecordDict({"config": _with_phase(config, "masked-input")}), node, MessageType.QUERY,
                              "secagg-masked-input")
            for node, config in contents.items()
        ]  # fmt: skip
        self.stream(self.grid, messages, handle)
        return total, sorted(survivors)


def _with_phase(config: ConfigRecord, phase: str) -> ConfigRecord:
    """The step a site is asked to take travels in the message's config."""
    return ConfigRecord({**dict(config), "phase": f"secagg-{phase}"})
