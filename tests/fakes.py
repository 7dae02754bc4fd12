"""Test doubles: the one builder of site updates, and stand-ins for Flower's Message and Grid.

A Flower Message cannot be built outside a run, so strategies take a message factory
and the tests pass :func:`fake_message`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from flwr.app import Context, RecordDict
from torch import Tensor

from common.config.run import RunConfig
from common.merge.engine import Accepted, MergeEngine
from common.merge.spec import MergeSpec
from common.updates.site import SiteUpdate, bn_layer_names, split_state
from common.updates.wire import update_to_records
from server.config import MergeConfig


def spec(**changes: object) -> MergeSpec:
    """The run config's default merge with ``changes`` (MergeSpec field names), uncapped unless asked.

    The tests of the maths check exact pooling by counts; the default cap on a site's
    share (``max-site-share``) has tests of its own.
    """
    return dataclasses.replace(RunConfig.defaults().merge_spec(), **{"max_share": 1.0, **changes})


def merge_config(
    min_sites: int = 2, timeout: float = 600.0, recalibrate: bool = False, **changes: object
) -> MergeConfig:
    """The strategy's settings for a test: no waiting between pulls, spec fields from ``changes``."""
    return MergeConfig(spec(**changes), min_sites, timeout, recalibrate, "batch", poll_interval=0.0)


def engine_merge(
    template: Mapping[str, Tensor], updates: list[SiteUpdate], weights: list[float] | None = None, **changes: object
) -> dict[str, Tensor]:
    """Every update through one engine, all accepted: the reference the adapters must reproduce."""
    engine = MergeEngine(spec(**changes), template)
    if engine.spec.weighting != "uniform" and engine.spec.max_share < 1.0:  # the claims, declared up front
        engine.expect_weights(weights or [float(u.num_examples) for u in updates])
    for i, update in enumerate(updates):
        assert isinstance(engine.ingest(update, None if weights is None else weights[i]), Accepted)
    return engine.result()


def perturbed(template: Mapping[str, Tensor], seed: int, scale: float = 0.05) -> dict[str, Tensor]:
    """``template`` with every float tensor moved by seeded noise (variances kept positive), integers + seed + 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in template.items():
        if not value.is_floating_point():
            out[key] = value + seed + 1
        elif key.endswith("running_var"):
            out[key] = value + scale * torch.rand(value.shape, generator=gen)
        else:
            out[key] = value + scale * torch.randn(value.shape, generator=gen)
    return out


def site_update(
    site: str,
    state: Mapping[str, Tensor],
    num_examples: int = 10,
    per_image: int = 100,
    metrics: dict[str, float] | None = None,
    counts: Mapping[str, Tensor] | None = None,
) -> SiteUpdate:
    """The update a site holding ``state`` sends: ``per_image`` values per BN channel and image.

    ``counts`` gives every layer's counts explicitly instead.
    """
    params, buffers = split_state(dict(state))
    n = per_image * num_examples
    if counts is None:
        counts = {layer: torch.full((state[f"{layer}.running_mean"].numel(),), n, dtype=torch.int64)
                  for layer in bn_layer_names(state)}  # fmt: skip
    return SiteUpdate(site, params, buffers, dict(counts), num_examples, dict(metrics or {}))


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


def step_name(message_type: str) -> str:
    """``"train"``, or a query's action as the tests name it (``query.secagg_share_keys`` -> ``secagg-share-keys``)."""
    return message_type.partition(".")[2].replace("_", "-") or message_type


def site_contexts(run: RunConfig, nodes: Sequence[int], run_id: int = 1) -> dict[int, Context]:
    """One simulated partition per node, as Flower's simulation gives each its node config."""
    flower = run.to_flower()
    return {node: Context(run_id, node, {"partition-id": i, "num-partitions": len(nodes)}, RecordDict(), flower)
            for i, node in enumerate(nodes)}  # fmt: skip


@dataclass
class SiteGrid:
    """Sites inside this process: every message goes to the real ClientApp's handler for its type, with that
    node's context.

    ``vanish`` maps a step (``train``, ``secagg-share-keys``, ...) to the nodes that never answer it
    (and nothing after). Every reply the server pulls is kept in ``received``.
    """

    contexts: dict[int, Context]
    vanish: dict[str, set[int]] = field(default_factory=dict)
    received: list[tuple[int, str, RecordDict]] = field(default_factory=list)
    truth: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # each site's adapted model
    gone: set[int] = field(default_factory=set)
    _ready: dict[str, FakeReply] = field(default_factory=dict)

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages) -> list[str]:
        from clients.client_app import handle

        ids = []
        for i, msg in enumerate(messages):
            node, step = msg.metadata.dst_node_id, step_name(msg.message_type)
            mid = f"{step}-{node}-{i}"
            ids.append(mid)
            if node in self.gone or node in self.vanish.get(step, set()):
                self.gone.add(node)
                continue
            self._ready[mid] = FakeReply(handle(msg.message_type, msg.content, self.contexts[node]), node, mid)
            self.received.append((node, step, self._ready[mid].content))
            if step == "train" and "secagg-update" in self.contexts[node].state:
                self.truth[node] = self.contexts[node].state["secagg-update"].to_torch_state_dict()
        return ids

    def pull_messages(self, message_ids) -> list[FakeReply]:
        return [self._ready.pop(m) for m in message_ids if m in self._ready]
