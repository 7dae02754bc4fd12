"""The one-shot strategy on replies built by hand: refusals, min-sites, streaming order."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from common.merge.spec import TiesOptions
from common.models.factory import build_model
from common.updates.site import SiteUpdate
from server.rounds.base import MinSitesNotMet
from server.strategy import OneShotMerge
from tests.fakes import (
    FakeGrid,
    engine_merge,
    error_reply,
    fake_message,
    merge_config,
    perturbed,
    reply_of,
    site_update,
)


def strategy_of(template, **config) -> OneShotMerge:
    return OneShotMerge(merge_config(**config), template, make_message=fake_message)


def _update(site: str, seed: int) -> SiteUpdate:
    torch.manual_seed(seed)
    state = perturbed(build_model("tiny_unet", 4).state_dict(), seed, scale=0.01)
    return site_update(site, state, num_examples=10 + seed, per_image=10 + seed, metrics={"mean-entropy": 0.5})


@pytest.fixture()
def template():
    return build_model("tiny_unet", 4).state_dict()


def _first_bn(update: SiteUpdate) -> str:
    return next(k[: -len(".running_mean")] for k in update.buffers if k.endswith(".running_mean"))


def _corrupt(kind: str, update: SiteUpdate) -> str:
    """Break ``update`` in one way; return the tensor name the refusal must mention."""
    layer = _first_bn(update)
    if kind == "nan":
        key = next(iter(update.params))
        update.params[key] = update.params[key].clone()
        update.params[key].view(-1)[0] = float("nan")
        return key
    if kind == "shape":
        key = next(iter(update.params))
        update.params[key] = torch.zeros(3, 3)
        return key
    if kind == "missing":
        key = list(update.params)[-1]
        del update.params[key]
        return key
    if kind == "negative-variance":
        key = f"{layer}.running_var"
        update.buffers[key] = update.buffers[key].clone()
        update.buffers[key][0] = -1.0
        return key
    if kind == "zero-count":
        update.counts[layer] = torch.zeros_like(update.counts[layer])
        return f"{layer}.num_samples"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "shape", "missing", "negative-variance", "zero-count"])
def test_bad_update_is_refused_naming_site_and_tensor_and_merge_goes_on(kind, template):
    good = [_update("day", 1), _update("dusk", 2)]
    bad = _update("night", 3)
    tensor = _corrupt(kind, bad)
    strategy = strategy_of(template, min_sites=2)
    arrays, _ = strategy.aggregate_train(1, [reply_of(good[0], 11), reply_of(bad, 13), reply_of(good[1], 12)])
    refused = strategy.report.incidents_of("refused")
    assert len(refused) == 1 and refused[0].node_id == 13
    assert "night" in refused[0].reason and tensor in refused[0].reason
    assert [s.domain for s in strategy.report.sites] == ["day", "dusk"]
    expected = engine_merge(template, good)
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_min_sites_not_met_is_a_clear_error(template):
    bad = _update("night", 3)
    _corrupt("nan", bad)
    strategy = strategy_of(template, min_sites=2)
    with pytest.raises(MinSitesNotMet, match="min-sites is 2"):
        strategy.aggregate_train(1, [reply_of(_update("day", 1), 1), reply_of(bad, 2), error_reply(3, 2, "boom")])
    assert [i.kind for i in strategy.report.incidents] == ["refused", "failed"]
    assert "boom" in strategy.report.incidents[1].reason


def test_refused_reply_mid_stream_leaves_sums_untouched(template):
    ups = [_update(f"s{i}", i) for i in range(4)]
    bad = _update("bad", 9)
    _corrupt("negative-variance", bad)
    clean = strategy_of(template, min_sites=1)
    for i, u in enumerate(ups):
        clean.intake.take_update(reply_of(u, i), i)
    with_bad = strategy_of(template, min_sites=1)
    for i, u in enumerate([*ups[:2], bad, *ups[2:]]):
        with_bad.intake.take_update(reply_of(u, i), i)
    a, b = clean.engine.result(), with_bad.engine.result()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_merge_is_bit_identical_to_all_at_once_in_any_order(template):
    ups = [_update(f"s{i}", i) for i in range(5)]
    expected = engine_merge(template, ups)
    orders = set()
    for seed in range(4):
        grid = FakeGrid({100 + i: reply_of(u) for i, u in enumerate(ups)}, per_pull=2, seed=seed)
        strategy = strategy_of(template, min_sites=5)
        merged = strategy.start(grid, ArrayRecord(template)).arrays.to_torch_state_dict()
        assert all(torch.equal(merged[k], expected[k]) for k in expected)
        orders.add(tuple(s.domain for s in strategy.report.sites))
    assert all(sorted(order) == [u.site for u in ups] for order in orders)
    assert len(orders) > 1  # the replies really did arrive in different orders


def test_silent_site_is_recorded_as_timeout(template):
    grid = FakeGrid({1: reply_of(_update("a", 1)), 2: reply_of(_update("b", 2)), 3: None})
    strategy = strategy_of(template, min_sites=2, timeout=0.5)
    strategy.start(grid, ArrayRecord(template))
    timeouts = strategy.report.incidents_of("timeout")
    assert [t.node_id for t in timeouts] == [3]


def test_start_honours_flowers_timeout_argument_over_the_run_configs(template):
    grid = FakeGrid({1: reply_of(_update("a", 1)), 2: reply_of(_update("b", 2)), 3: None})
    strategy = strategy_of(template, min_sites=2, timeout=600.0)
    strategy.start(grid, ArrayRecord(template), timeout=1.0)
    [timeout] = strategy.report.incidents_of("timeout")
    assert (timeout.node_id, timeout.reason) == (3, "no reply within 1s")
    with pytest.raises(ValueError, match="num_rounds must be 1"):
        strategy.start(grid, ArrayRecord(template), num_rounds=2)


def test_counts_weighting_and_report_entries(template):
    ups = [_update("a", 1), _update("b", 5)]
    strategy = strategy_of(template, min_sites=2, weighting="counts")
    arrays, metrics = strategy.aggregate_train(1, [reply_of(u, i) for i, u in enumerate(ups)])
    expected = engine_merge(template, ups, weighting="counts")
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert metrics["num-examples"] == 11 + 15
    entry = strategy.report.sites[0]
    assert entry.num_examples == 11 and entry.bytes_received > 0
    assert set(entry.manifest) == {"params", "buffers", "counts", "info", "metrics"}


def test_the_summary_names_the_method_its_options_and_every_round_after_the_merge(template, caplog):
    ties = TiesOptions(k=0.2)
    strategy = strategy_of(template, recalibrate=True, method="ties", options=ties, clip_norm=2.0)
    with caplog.at_level("INFO", logger="server.strategy"):
        strategy.summary()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "method: ties (k=0.2" in text
    assert "clip-norm 2" in text
    assert text.splitlines()[-1].endswith("then: recalibration round (batch)")


def test_an_evaluate_config_adds_the_sites_label_free_scores_of_the_merged_model():
    """Flower's evaluate round for a one-shot merge: every site scores the final model; scalars only come back."""
    import dataclasses

    from flwr.app import ConfigRecord

    from common.config.run import RunConfig
    from common.scoring.scores import SCORES
    from server.config import MergeConfig
    from tests.fakes import SiteGrid, fake_message, site_contexts

    site_data = ";".join(f"synthetic?domain={s}&n=4&size=32x48" for s in ("fog", "night"))
    run = RunConfig.read({"arch": "tiny_unet", "site-data": site_data, "batch-size": 2})
    torch.manual_seed(0)
    template = build_model("tiny_unet", 9).state_dict()
    config = dataclasses.replace(MergeConfig.from_run(run), poll_interval=0.0)
    strategy = OneShotMerge(config, template, make_message=fake_message)
    grid = SiteGrid(site_contexts(run, (5, 6), run_id=9))
    plain = strategy.start(grid, ArrayRecord(template))
    assert not plain.evaluate_metrics_clientapp and "evaluate" not in {step for _, step, _ in grid.received}
    strategy = OneShotMerge(config, template, make_message=fake_message)
    result = strategy.start(grid, ArrayRecord(template), evaluate_config=ConfigRecord({"note": "x"}))
    metrics = result.evaluate_metrics_clientapp[1]
    assert metrics["sites"] == 2 and 0.0 <= metrics["confident"] <= 1.0
    assert set(strategy.report.evaluation) == {"5", "6"}
    assert all(set(s) <= set(SCORES) for s in strategy.report.evaluation.values())


def test_a_strategy_that_writes_from_its_engine_builds_no_copy_of_the_merged_model(template):
    """The ServerApp writes merged.safetensors from the engine's sums: no round needs the whole model as a record."""
    replies = {1: reply_of(_update("a", 1)), 2: reply_of(_update("b", 2))}
    lean = OneShotMerge(merge_config(min_sites=2), template, make_message=fake_message, result_arrays=False)
    result = lean.start(FakeGrid(dict(replies)), ArrayRecord(template))
    assert len(result.arrays) == 0 and lean.state.merged is None
    assert result.train_metrics_clientapp[1]["sites"] == 2
    scorer = OneShotMerge(merge_config(min_sites=2), template, make_message=fake_message, result_arrays=False)
    scored = scorer.start(FakeGrid(dict(replies)), ArrayRecord(template), evaluate_fn=lambda r, arrays: None)
    assert len(scored.arrays) == len(template)  # a caller that scores the merge gets it
    full = strategy_of(template, min_sites=2).start(FakeGrid(dict(replies)), ArrayRecord(template))
    assert set(full.arrays.keys()) == set(template)  # Flower's contract by default: Result.arrays is the merge
