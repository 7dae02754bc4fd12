"""A hostile or broken site: nothing a reply says becomes a path, crashes the run, or decides the merge alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from common.bn.stats import BNSums
from common.config.run import RunConfig
from common.merge.bn_pooling import capped_shares
from common.models.factory import build_model
from common.updates.site import bn_layer_names
from common.updates.wire import Action, sums_to_records
from server.config import MergeConfig
from server.results import UPDATES_DIR, save_update
from server.strategy import OneShotMerge
from tests.fakes import FakeGrid, FakeReply, engine_merge, fake_message, merge_config, perturbed, reply_of, site_update


@pytest.fixture(scope="module")
def template() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("tiny_unet", 4).state_dict()


def _update(template, site: str, seed: int, n: int = 10):
    return site_update(site, perturbed(template, seed), num_examples=n, per_image=6)


def _strategy(template, **config) -> OneShotMerge:
    return OneShotMerge(merge_config(**config), template, make_message=fake_message)


HOSTILE_DOMAINS = ["../../x", "/etc/passwd", "a/b/c", "x" * 300, "fog", "fog", "", "..", "ünïcode\n名前"]


def test_nothing_a_site_says_becomes_a_path_and_same_named_sites_are_all_kept(template, tmp_path):
    out = tmp_path / "out"
    run = RunConfig.read({"out-dir": str(out), "arch": "tiny_unet", "num-classes": 4})
    saved = []
    strategy = OneShotMerge(
        merge_config(min_sites=1), template, make_message=fake_message,
        on_update=lambda update, node: saved.append(save_update(out, node, update, run)),
    )  # fmt: skip
    replies = [reply_of(_update(template, d, i), 100 + i) for i, d in enumerate(HOSTILE_DOMAINS)]
    strategy.aggregate_train(1, replies)
    assert len(strategy.report.sites) == len(HOSTILE_DOMAINS)  # both "fog" sites are in
    files = sorted(p.resolve() for p in (out / UPDATES_DIR).rglob("*") if p.is_file())
    assert len(files) == len(HOSTILE_DOMAINS) == len(set(saved))
    assert all(p.parent == (out / UPDATES_DIR).resolve() for p in files)  # nothing outside, no sub-folders
    assert not (tmp_path / "x").exists()
    for path in files:
        assert path.name.startswith("node-") and len(path.stem) <= len("node-") + 3 + 1 + 64
        assert all(c.isalnum() or c in "._-" for c in path.stem)
    assert [s.domain for s in strategy.report.sites].count("fog") == 2


def _break(content, how: str) -> None:
    counts = content["counts"]
    if how == "inf-examples":
        content["counts"] = MetricRecord({**counts, "num-examples": float("inf")})
    elif how == "huge-bn-count":
        layer = next(k for k in counts if k.startswith("bn:"))
        content["counts"] = MetricRecord({**counts, layer: [2**63] * len(counts[layer])})
    elif how == "negative-examples":
        content["counts"] = MetricRecord({**counts, "num-examples": -3})
    elif how == "no-params":
        del content["params"]
    elif how == "garbage-array":
        key = next(iter(content["params"].keys()))
        array = content["params"][key]
        content["params"][key] = dataclasses.replace(array, data=array.data[:20])


@pytest.mark.parametrize(
    "how,reason",
    [
        ("inf-examples", "num-examples must be a whole number"),
        ("huge-bn-count", "outside 0..2^62"),
        ("negative-examples", "num-examples = -3 is outside"),
        ("no-params", "no 'params' record"),
        ("garbage-array", "unreadable reply"),
    ],
)
def test_a_reply_that_breaks_decoding_is_one_incident_and_the_others_merge_exactly(template, how, reason):
    good = [_update(template, "day", 1), _update(template, "dusk", 2)]
    bad = reply_of(_update(template, "evil", 3), 13)
    _break(bad.content, how)
    strategy = _strategy(template, min_sites=2)
    arrays, _ = strategy.aggregate_train(1, [reply_of(good[0], 11), bad, reply_of(good[1], 12)])
    [incident] = strategy.report.incidents
    assert incident.node_id == 13 and incident.kind == "refused" and reason in incident.reason
    expected = engine_merge(template, good)
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


class _RecalGrid(FakeGrid):
    """Answers train messages with updates and recalibration queries with the prepared sums replies."""

    def __init__(self, updates: dict, sums: dict) -> None:
        super().__init__(updates)
        self.sums = sums

    def push_messages(self, messages) -> list[str]:
        if messages and messages[0].message_type == Action.RECALIBRATE:
            for msg in messages:
                self.replies[msg.metadata.dst_node_id] = self.sums[msg.metadata.dst_node_id]
        return super().push_messages(messages)


def _sums(template, scale: float, shape_ok: bool = True) -> dict[str, BNSums]:
    out = {}
    for layer in bn_layer_names(template):
        c = template[f"{layer}.running_mean"].numel() if shape_ok else 1
        n = torch.full((c,), 60, dtype=torch.int64)
        mean = torch.full((c,), scale, dtype=torch.float64)
        out[layer] = BNSums(mean * 60, (mean * mean + 1) * 60, n)
    return out


def test_wrong_shaped_recalibration_sums_are_refused_and_the_round_goes_on(template):
    updates = {1: reply_of(_update(template, "a", 1), 1), 2: reply_of(_update(template, "b", 2), 2),
               3: reply_of(_update(template, "c", 3), 3)}  # fmt: skip
    sums = {1: FakeReply(sums_to_records(_sums(template, 0.0), 10, "a"), 1),
            2: FakeReply(sums_to_records(_sums(template, 2.0), 10, "b"), 2),
            3: FakeReply(sums_to_records(_sums(template, 9.0, shape_ok=False), 10, "c"), 3)}  # fmt: skip
    strategy = _strategy(template, min_sites=2, recalibrate=True)
    result = strategy.start(_RecalGrid(updates, sums), ArrayRecord(template))
    refused = strategy.report.incidents_of("refused")
    assert [i.node_id for i in refused] == [3] and "recalibration" in refused[0].reason
    assert strategy.report.recalibration["applied"] is True
    layer = bn_layer_names(template)[0]
    mean = result.arrays.to_torch_state_dict()[f"{layer}.running_mean"]
    torch.testing.assert_close(mean, torch.ones_like(mean))  # (0 + 2) / 2: the bad site left no trace


def test_a_site_claiming_a_million_times_its_counts_moves_the_default_merge_no_further_than_the_cap(template):
    """The bound: with share s_h honestly and at most c when lying, each pooled moment moves by at most
    (c - s_h) times the spread of the sites' moments in that channel (a convex combination's shift)."""
    defaults = RunConfig.defaults().merge_spec()
    cap = defaults.max_share
    assert cap < 1.0  # the default bounds a site's influence
    honest = [_update(template, f"s{i}", i, n=10) for i in range(3)]
    liar = honest[2]
    lying = site_update("s2", liar.state_dict(), num_examples=10 * 10**6, per_image=6)
    config = MergeConfig(defaults, min_sites=3, timeout=60.0, recalibrate=False, recalibrate_mode="batch")
    merged = {}
    for name, updates in (("honest", honest), ("lying", [*honest[:2], lying])):
        strategy = OneShotMerge(dataclasses.replace(config, poll_interval=0.0), template, make_message=fake_message)
        merged[name] = strategy.aggregate_train(1, [reply_of(u, i) for i, u in enumerate(updates)])[0]
    a, b = merged["honest"].to_torch_state_dict(), merged["lying"].to_torch_state_dict()
    shares = capped_shares(np.array([10.0, 10.0, 10.0]), cap)
    s_h = float(shares[2])
    for layer in bn_layer_names(template):
        means = torch.stack([u.buffers[f"{layer}.running_mean"].double() for u in honest])
        second = torch.stack([u.buffers[f"{layer}.running_var"].double() for u in honest]) + means**2
        for moment, values in (("mean", means), ("second", second)):
            spread = values.max(0).values - values.min(0).values
            ma, mb = a[f"{layer}.running_mean"].double(), b[f"{layer}.running_mean"].double()
            if moment == "second":
                ma, mb = a[f"{layer}.running_var"].double() + ma**2, b[f"{layer}.running_var"].double() + mb**2
            assert bool(((mb - ma).abs() <= (cap - s_h) * spread + 1e-5).all()), (layer, moment)
    # and without the cap the liar takes the statistics over entirely
    uncapped = engine_merge(template, [*honest[:2], lying], max_share=1.0)
    layer = bn_layer_names(template)[0]
    torch.testing.assert_close(
        uncapped[f"{layer}.running_mean"], liar.buffers[f"{layer}.running_mean"], rtol=1e-4, atol=1e-5
    )


def test_counts_that_contradict_each_other_or_the_census_are_refused(template):
    from common.bn.stats import bn_count_profile

    profile = bn_count_profile(build_model("tiny_unet", 4))
    strategy = OneShotMerge(merge_config(min_sites=1), template, make_message=fake_message, profile=profile)

    def real_counts(update):  # what a site with 64x64 images really measures
        for layer, ratio in profile.spatial.items():
            update.counts[layer] = torch.full_like(update.counts[layer], round(4096 * ratio) * update.num_examples)
        return update

    inflated = real_counts(_update(template, "evil", 1))
    layer = bn_layer_names(template)[-1]
    inflated.counts[layer] = inflated.counts[layer] * 10**6  # one layer claims far more than the architecture allows
    mixed = real_counts(_update(template, "mixed", 2))
    mixed.counts[layer] = mixed.counts[layer].clone()
    mixed.counts[layer][0] += 10  # channels of one layer see the same values
    strategy.aggregate_train(1, [reply_of(real_counts(_update(template, "ok", 0, n=1)), 1), reply_of(inflated, 2),
                                 reply_of(mixed, 3)])  # fmt: skip
    reasons = {i.node_id: i.reason for i in strategy.report.incidents}
    assert "the architecture gives about" in reasons[2]
    assert "counts differ between channels" in reasons[3]
    census = _strategy(template, min_sites=1, weighting="counts", max_share=0.5)
    census.intake.claims = {1: 10, 2: 10}
    census.engine.expect_weights([10, 10])
    census.intake.take_update(reply_of(_update(template, "a", 1, n=10), 1), 1)
    census.intake.take_update(reply_of(_update(template, "b", 2, n=50), 2), 2)
    assert [s.node_id for s in census.report.sites] == [1]
    assert "claims 50 images, 10 in the census" in census.report.incidents[0].reason
