"""Secure aggregation: the server learns only sums, and they equal the plain merge within the stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from common.config.run import ConfigError, RunConfig
from common.models.factory import build_model
from server.config import MergeConfig
from server.strategy import OneShotMerge
from tests.fakes import SiteGrid, fake_message, site_contexts

SITES = (101, 202, 303)
SITE_DATA = ";".join(f"synthetic?domain={style}&n=4&size=32x48" for style in ("fog", "night", "rain"))
RUN = {"arch": "tiny_unet", "site-data": SITE_DATA,
       "batch-size": 2, "method": "adabn", "min-sites": 2}  # fmt: skip


def _merge(overrides: dict, vanish: dict | None = None) -> tuple[OneShotMerge, SiteGrid, dict[str, torch.Tensor]]:
    run = RunConfig.read({**RUN, **overrides})
    torch.manual_seed(0)
    template = build_model(run.arch, 9).state_dict()
    grid = SiteGrid(site_contexts(run, SITES), vanish or {})
    config = MergeConfig.from_run(run)
    strategy = OneShotMerge(MergeConfig(**{**config.__dict__, "timeout": 1.0, "poll_interval": 0.0}), template,
                            make_message=fake_message)  # fmt: skip
    result = strategy.start(grid, ArrayRecord(template))
    return strategy, grid, result.arrays.to_torch_state_dict()


def _assert_close(secure: dict, plain: dict, rtol: float) -> None:
    for key, value in plain.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(secure[key], value), key
            continue
        scale = float(value.double().abs().max()) or 1.0
        diff = float((secure[key].double() - value.double()).abs().max())
        assert diff <= rtol * scale, (key, diff, scale)


@pytest.mark.parametrize("weighting", ["uniform", "counts"])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_the_secure_merge_equals_the_plain_merge_within_the_stated_bound(weighting, recalibrate):
    settings = {"param-weighting": weighting, "recalibrate": recalibrate}
    _, _, plain = _merge(settings)
    strategy, _, secure = _merge({**settings, "secure-aggregation": True})
    bound = strategy.report.secure["merge"]["relative_error_bound"]
    assert 0 < bound < 1e-12  # 64-bit fixed point: far inside the 1e-4 relative asked for
    _assert_close(secure, plain, rtol=1e-6)
    assert sorted(s.node_id for s in strategy.report.sites) == list(SITES)


def test_the_server_receives_nothing_from_which_one_sites_model_could_be_read():
    arch = {"arch": "small_unet"}  # half a million parameters: a correlation of 0.01 is 7 standard errors
    strategy, grid, merged = _merge({"secure-aggregation": True, **arch})
    assert {step for _, step, _ in grid.received} == {"train", "secagg-share-keys", "secagg-masked-input",
                                                      "secagg-unmask"}  # fmt: skip
    params = [k for k in merged if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    size = sum(merged[k].numel() for k in params)
    for node, step, content in grid.received:
        assert "params" not in content and "buffers" not in content
        if step == "train":  # after adapting, only public keys, the image count and the label leave
            assert set(content) == {"keys", "counts", "info"}
        if step == "secagg-masked-input":
            masked = content["masked"]["y"].numpy()[:size].astype(np.float64)
            true = torch.cat([grid.truth[node][k].double().reshape(-1) for k in params]).numpy()
            assert abs(np.corrcoef(masked, true)[0, 1]) < 0.01  # independent of this site's parameters
            assert "secagg-update" not in grid.contexts[node].state  # the site kept nothing of the sum
    assert len(strategy.report.sites) == len(SITES)


def test_a_site_that_drops_out_after_its_masked_input_is_named_and_the_merge_completes():
    _, _, plain = _merge({})
    strategy, _, secure = _merge({"secure-aggregation": True}, vanish={"secagg-unmask": {303}})
    dropouts = strategy.report.incidents_of("dropout")
    assert [i.node_id for i in dropouts] == [303] and "still in the sum" in dropouts[0].reason
    _assert_close(secure, plain, rtol=1e-6)  # its vector is in the sum: the same merge as with everyone


def test_a_site_that_drops_out_before_its_masked_input_is_left_out_and_its_masks_removed():
    _, _, two = _merge({}, vanish={"train": {303}})
    strategy, _, secure = _merge({"secure-aggregation": True}, vanish={"secagg-masked-input": {303}})
    assert 303 not in strategy.report.secure["merge"]["survivors"]
    _assert_close(secure, two, rtol=1e-6)


def test_secure_aggregation_refuses_what_would_need_one_sites_values():
    refusals = [
        ({"merge-method": "ties"}, "merge-method 'ties' is not a sum"),
        ({"bn-bank": "own"}, "bn-bank ships each site's statistics"),
        ({"clip-norm": 1.0}, "without clip-norm"),
        ({"buffer-mode": "average"}, "pools BN statistics as Gaussians, not 'average'"),
    ]
    for bad, message in refusals:
        with pytest.raises(ConfigError, match=message):
            RunConfig.read({**RUN, **bad, "secure-aggregation": True})
        RunConfig.read({**RUN, **bad})  # the setting alone is fine: secure aggregation is what refuses it
