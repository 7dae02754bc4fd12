"""The scale path of the merge: flat sums, float32 sums, zero-copy replies, one reply in memory."""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.merge.engine import Accepted, MergeEngine, Refused
from common.models.factory import build_model
from common.updates.site import SiteUpdate, split_state
from common.updates.wire import numpy_to_array, records_to_update, update_to_records
from server.strategy import OneShotMerge
from tests.fakes import FakeReply, engine_merge, fake_message, merge_config, perturbed, site_update, spec

PRECISION = {torch.float64: "float64", torch.float32: "float32"}


def merge_updates(template, updates, weighting="uniform", weights=None, param_dtype=torch.float64):
    return engine_merge(template, updates, weights, weighting=weighting, precision=PRECISION[param_dtype])


def _update(site: str, seed: int, template: dict[str, torch.Tensor]) -> SiteUpdate:
    return site_update(site, perturbed(template, seed), num_examples=5 + seed, per_image=10 + seed)


@pytest.fixture(scope="module")
def template() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("tiny_unet", 4).state_dict()


@pytest.fixture(scope="module")
def updates(template) -> list[SiteUpdate]:
    return [_update(f"s{i}", i, template) for i in range(6)]


def _reference_params(template, updates, weights) -> dict[str, torch.Tensor]:
    """Per-tensor float64 sums in site order: what the flat buffer must reproduce bit for bit."""
    total = sum(weights)
    out = {}
    for key in split_state(template)[0]:
        acc = updates[0].params[key].double() * weights[0]
        for u, w in zip(updates[1:], weights[1:], strict=True):
            acc += u.params[key].double() * w
        out[key] = (acc / total).to(template[key].dtype)
    return out


@pytest.mark.parametrize("weighting", ["uniform", "counts", "explicit"])
def test_flat_float64_sums_equal_per_tensor_float64_sums(template, updates, weighting):
    weights = {"uniform": [1.0] * 6, "counts": [float(u.num_examples) for u in updates], "explicit": None}[weighting]
    weights = weights or [0.3, 1.7, 2.0, 0.25, 5.0, 1.1]
    merged = merge_updates(template, updates, weighting, weights=weights if weighting == "explicit" else None)
    expected = _reference_params(template, updates, weights)
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert list(merged) == list(template) and all(merged[k].dtype == template[k].dtype for k in template)


def test_float32_sums_stay_within_the_rounding_bound(template, updates):
    exact = merge_updates(template, updates, "counts")
    lean = merge_updates(template, updates, "counts", param_dtype=torch.float32)
    weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    k = len(updates)
    for key in split_state(template)[0]:
        magnitude = sum(w * u.params[key].double().abs() for w, u in zip(weights, updates, strict=True)) / weights.sum()
        bound = (k + 1) * 2.0**-24 * magnitude + 2.0**-24 * exact[key].double().abs()
        assert bool(((lean[key].double() - exact[key].double()).abs() <= bound).all()), key
    for key in template:  # BN statistics are pooled in float64 in both modes
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(lean[key], exact[key]), key


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["missing", "shape", "counts", "bn-channels"])
def test_an_update_that_does_not_fit_changes_nothing(template, updates, param_dtype, kind):
    acc = MergeEngine(spec(precision=PRECISION[param_dtype]), template)
    for u in updates[:3]:
        assert isinstance(acc.ingest(u), Accepted)
    before = acc.result()
    bad = _update("bad", 9, template)
    layer = next(iter(bad.counts))
    if kind == "missing":
        del bad.params[list(bad.params)[-1]]
    elif kind == "shape":
        key = list(bad.params)[-1]
        bad.params[key] = torch.zeros(2, 2)
    elif kind == "counts":
        del bad.counts[layer]
    else:
        bad.buffers[f"{layer}.running_mean"] = torch.zeros(1)
    assert isinstance(acc.ingest(bad), Refused)
    after = acc.result()
    assert acc.sites == ["s0", "s1", "s2"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_result_does_not_consume_the_sums(template, updates):
    acc = MergeEngine(spec(precision="float32"), template)
    acc.ingest(updates[0])
    first = acc.result()
    assert all(torch.equal(first[k], v) for k, v in acc.result().items())
    acc.ingest(updates[1])
    key = next(iter(updates[0].params))
    assert not torch.equal(acc.result()[key], first[key])


def test_records_to_update_views_the_reply_bytes(updates):
    content = update_to_records(updates[0], "adabn")
    update = records_to_update(content, "fallback")
    flower = content["params"].to_torch_state_dict()
    for key, tensor in update.params.items():
        assert torch.equal(tensor, flower[key]) and tensor.dtype == flower[key].dtype
        raw = np.frombuffer(content["params"][key].data, dtype=np.uint8)
        start = tensor.untyped_storage().data_ptr()
        assert raw.ctypes.data <= start and start + tensor.nbytes <= raw.ctypes.data + raw.size, key
    assert update.site == "s0" and update.num_examples == updates[0].num_examples
    assert all(torch.equal(update.counts[k], v) for k, v in updates[0].counts.items())


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).standard_normal((64, 3, 7, 7)).astype(np.float32),
        np.array(7, dtype=np.int64),
        np.zeros((0, 5), dtype=np.float32),
        np.ones(3, dtype=np.float16),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(20.0)[::2],
    ],
    ids=["conv", "0-d", "empty", "half", "fortran", "strided"],
)
def test_numpy_to_array_writes_flowers_bytes(values):
    ours, flowers = numpy_to_array(values), Array.from_numpy_ndarray(values)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
        flowers.data,
        flowers.dtype,
        flowers.shape,
        flowers.stype,
    )


def test_half_precision_updates_add_into_either_sum(template, updates):
    half = [site_update(u.site, {**{k: v.half() for k, v in u.params.items()}, **u.buffers}, 1, counts=u.counts)
            for u in updates]  # fmt: skip
    template_half = {k: v.half() if k in half[0].params else v for k, v in template.items()}
    expected = _reference_params(template_half, half, [1.0] * len(half))
    exact = merge_updates(template_half, half)
    lean = merge_updates(template_half, half, param_dtype=torch.float32)
    for key, value in expected.items():
        assert exact[key].dtype == lean[key].dtype == torch.float16
        assert torch.equal(exact[key], value), key
        torch.testing.assert_close(lean[key], value, rtol=1e-3, atol=1e-3)


@dataclass
class LazyGrid:
    """A SuperLink stand-in whose replies exist only once pulled, as they would be in a real server.

    ``ready_per_pull=None`` makes every reply ready at once (the worst case for memory if
    a strategy pulls them together); an int releases that many per pull call, in an order
    shuffled by ``seed``. It records how many replies are alive while one is merged, and
    how many earlier replies and earlier updates' tensors are still alive at each pull.
    """

    updates: dict[int, SiteUpdate]
    ready_per_pull: int | None = None
    seed: int = 0
    max_replies_alive: int = 0
    max_tensors_alive: int = 0
    max_replies_while_merging: int = 0
    tensors: list[weakref.ref] = field(default_factory=list)
    _replies: list[weakref.ref] = field(default_factory=list)
    _node_of: dict[str, int] = field(default_factory=dict)
    _schedule: list[str] = field(default_factory=list)
    _ready: set[str] = field(default_factory=set)

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def push_messages(self, messages) -> list[str]:
        ids = [f"m{i}" for i in range(len(messages))]
        self._node_of = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True)}
        self._schedule = ids.copy()
        random.Random(self.seed).shuffle(self._schedule)
        return ids

    def pull_messages(self, message_ids) -> list[FakeReply]:
        self.max_replies_alive = max(self.max_replies_alive, sum(r() is not None for r in self._replies))
        self.max_tensors_alive = max(self.max_tensors_alive, sum(t() is not None for t in self.tensors))
        step = len(self._schedule) if self.ready_per_pull is None else self.ready_per_pull
        self._ready.update(self._schedule[:step])
        del self._schedule[:step]
        out = []
        for mid in message_ids:
            if mid in self._ready:
                self._ready.discard(mid)
                node = self._node_of[mid]
                reply = FakeReply(update_to_records(self.updates[node], "adabn"), node, mid)
                self._replies.append(weakref.ref(reply))
                out.append(reply)
        return out

    def watch(self, update: SiteUpdate, node_id: int) -> None:
        """``on_update`` hook: follow the tensors the server built from each reply."""
        alive = sum(r() is not None for r in self._replies)
        self.max_replies_while_merging = max(self.max_replies_while_merging, alive)
        self.tensors.extend(weakref.ref(t) for t in update.params.values())


def _stream(template, grid: LazyGrid, param_dtype=torch.float64) -> tuple[OneShotMerge, dict[str, torch.Tensor]]:
    config = merge_config(min_sites=len(grid.updates), precision=PRECISION[param_dtype])
    strategy = OneShotMerge(config, template, on_update=grid.watch, make_message=fake_message)
    result = strategy.start(grid, ArrayRecord(template))
    return strategy, result.arrays.to_torch_state_dict()


def test_streaming_holds_one_reply_even_when_all_are_ready_at_once(template, updates):
    grid = LazyGrid({100 + i: u for i, u in enumerate(updates)})
    strategy, merged = _stream(template, grid)
    assert len(strategy.report.sites) == len(updates)
    assert grid.max_replies_while_merging == 1
    assert grid.max_replies_alive == 0  # every earlier reply was dropped before the next pull
    assert grid.max_tensors_alive == 0 and all(t() is None for t in grid.tensors)
    expected = merge_updates(template, updates)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32])
def test_streaming_order_varies_but_the_float64_merge_does_not(template, updates, param_dtype):
    expected = merge_updates(template, updates, param_dtype=param_dtype)
    orders = set()
    for seed in range(6):
        grid = LazyGrid({100 + i: u for i, u in enumerate(updates)}, ready_per_pull=1, seed=seed)
        strategy, merged = _stream(template, grid, param_dtype)
        order = tuple(s.domain for s in strategy.report.sites)
        orders.add(order)
        assert sorted(order) == [u.site for u in updates]
        in_order = merge_updates(
            template, [next(u for u in updates if u.site == s) for s in order], param_dtype=param_dtype
        )
        assert all(torch.equal(merged[k], in_order[k]) for k in in_order)  # streaming == all-at-once, same order
        if param_dtype == torch.float64:  # ... and float64 sums do not depend on the order at all
            assert all(torch.equal(merged[k], expected[k]) for k in expected), order
    assert len(orders) > 1


def test_merged_record_matches_a_record_of_the_whole_result(template, updates):
    strategy = OneShotMerge(merge_config(min_sites=2), template, make_message=fake_message)
    arrays, _ = strategy.aggregate_train(
        1, [FakeReply(update_to_records(u, "adabn"), i) for i, u in enumerate(updates)]
    )
    whole = ArrayRecord(strategy.engine.result())
    assert list(arrays) == list(whole)
    assert all(arrays[k].data == whole[k].data for k in whole)
    back = arrays.to_torch_state_dict()  # what a reader of the record gets: the merged tensors, dtypes and all
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in strategy.engine.result().items())


def test_param_precision_is_chosen_from_the_run_config(tmp_path):
    from common.config.run import RunConfig
    from server.config import ServerConfig

    config = ServerConfig.from_run(RunConfig.read({"out-dir": str(tmp_path), "param-precision": "float32"}))
    assert config.merge.spec.precision == "float32"
    assert OneShotMerge(config.merge, {"w": torch.zeros(3)}).engine.params.sums.dtype == torch.float32
    assert ServerConfig.from_run(RunConfig.read({"out-dir": str(tmp_path)})).merge.spec.precision == "float64"
    with pytest.raises(ValueError, match="param-precision must be one of float64, float32, not 'float16'"):
        RunConfig.read({"out-dir": str(tmp_path), "param-precision": "float16"})


def test_a_huge_but_finite_update_is_accepted_though_its_screening_sum_overflows(template, updates):
    from common.updates.validation import validate_update

    big = updates[0]
    key = next(k for k, v in big.params.items() if v.numel() >= 4)
    params = dict(big.params)
    params[key] = torch.full_like(params[key], 3e38)  # finite, but the float32 sum is inf
    validate_update(site_update(big.site, {**params, **big.buffers}, big.num_examples, counts=big.counts), template)
    params[key] = params[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf values"):
        validate_update(site_update(big.site, {**params, **big.buffers}, big.num_examples, counts=big.counts), template)
