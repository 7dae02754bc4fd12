"""The run config: one typed reader whose defaults live only in pyproject.toml; every bad value refused by name."""

from __future__ import annotations

import dataclasses
import tomllib
import typing

import pytest

from clients.config import SiteConfig
from common.config.run import REPLACED_KEYS, ConfigError, RunConfig, app_pyproject, declared_defaults
from common.options.typed import OptionError
from server.config import ServerConfig
from server.simulation import SimulationPlan


def test_the_typed_config_has_exactly_the_declared_keys_with_their_types():
    declared = tomllib.loads(app_pyproject().read_text())["tool"]["flwr"]["app"]["config"]
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name.replace("_", "-"): hints[f.name] for f in dataclasses.fields(RunConfig)}
    assert fields == {k: type(v) for k, v in declared.items()}
    assert RunConfig.defaults().to_flower() == declared  # the defaults are pyproject's, nothing else


@pytest.mark.parametrize(
    "values,message",
    [
        ({"recalibrate": "False"}, "run-config key 'recalibrate' must be true or false, not 'False'"),
        ({"save-updates": "no"}, "'save-updates' must be true or false, not 'no'"),
        ({"save-updates": 1}, "'save-updates' must be true or false, not 1"),
        ({"min-sites": "abc"}, "'min-sites' must be an integer, not 'abc'"),
        ({"min-sites": 2.5}, "'min-sites' must be an integer, not 2.5"),
        ({"timeout": "soon"}, "'timeout' must be a number"),
        ({"timeout": float("inf")}, "'timeout' must be a finite number"),
        ({"min-site": 2}, "unknown run-config key 'min-site' (did you mean 'min-sites'?)"),
        ({"bufer-mode": "x"}, "(did you mean 'buffer-mode'?)"),
        ({"buffer-mode": "gausian"}, "buffer-mode must be one of gaussian, reference, average, first, not 'gausian'"),
        ({"param-weighting": "explicit"}, "param-weighting must be one of uniform, counts"),
        ({"merge-method": "tie"}, "unknown merge method 'tie' (did you mean 'ties'?)"),
        ({"merge-method": "ties", "merge-options": "k=2"}, "k (fraction of entries kept) must be in (0, 1]"),
        ({"merge-options": "lam"}, "merge-options item 'lam' is not key=value"),
        ({"max-site-share": 0.0}, "max-site-share must be in (0, 1]"),
        ({"clip-norm": -1.0}, "clip-norm must be a finite number >= 0"),
        ({"min-sites": 0}, "min-sites must be at least 1, not 0"),
        ({"arch": "smal_unet"}, "arch: unknown architecture 'smal_unet' (did you mean 'small_unet'?)"),
        ({"arch": "hrda_smal_unet"}, "arch: unknown architecture 'smal_unet'"),
        ({"dataset": "camvid"}, "run-config key 'dataset' was replaced by 'site-data', a data spec: site-data ="),
        ({"eval-domains": "a,b"}, "run-config key 'eval-domains' was replaced by 'eval-data'"),
        ({"source-num-images": 4}, "run-config key 'source-num-images' was replaced by 'source-data'"),
        ({"site-data": "camvid?domain=x"}, "run config 'site-data': dataset 'camvid' needs a root directory"),
        ({"site-data": "synthetic?domain=fog&tim=first:3"}, "unknown key 'tim'"),
        ({"site-data": ""}, "site-data names no data"),
        ({"site-data": "synthetic?domain={domain};synthetic"}, "a {domain} template is one spec"),
        ({"source-data": "synthetic;synthetic?domain=fog"}, "source-data is one spec, not 2"),
        ({"eval-data": "synthetic?domain=fog;synthetic?domain=fog&n=3"}, "the name 'fog' is given to two specs"),
        ({"strategy": "fedprox"}, "strategy must be one of one-shot, fedavg"),
        ({"bn-image-weight": 1.5}, "bn-image-weight must be in [0, 1] (0: off, 1: each image's own statistics)"),
        ({"select": "label-free", "select-candidates": "default; bn-image-weight=-0.1"}, "bn-image-weight must be"),
        ({"merge-method": "layerwise"}, "layerwise: name the anchor site (anchor=SITE)"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_key(values, message):
    with pytest.raises(OptionError) as info:
        RunConfig.read(values)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_arch_is_a_registered_one_or_its_hrda_wrapper():
    assert RunConfig.read({"arch": "hrda_segformer_b0"}).arch == "hrda_segformer_b0"


def test_booleans_are_toml_booleans_or_exactly_true_or_false():
    assert RunConfig.read({"recalibrate": "true"}).recalibrate is True
    assert RunConfig.read({"recalibrate": False}).recalibrate is False
    assert RunConfig.read({"timeout": 5}).timeout == 5.0  # an integer is a fine float


@pytest.mark.parametrize(
    "num_sites,overrides,message",
    [
        (0, {}, "num-sites must be an integer of at least 1, not 0"),
        ("three", {}, "num-sites must be an integer of at least 1"),
        (3, {"min-sites": 4}, "min-sites = 4 is more than the 3 simulated sites"),
    ],
)
def test_impossible_simulations_are_refused_before_anything_starts(num_sites, overrides, message):
    plan = SimulationPlan("t", num_sites, {"min-sites": 1})
    with pytest.raises(ConfigError, match=message):
        plan.resolve(overrides)


def test_a_simulation_file_with_a_bad_key_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('num-sites = 2\n[run-config]\nrecalibrate = "yes"\n')
    with pytest.raises(ValueError, match=r"sim\.toml: run-config key 'recalibrate' must be true or false"):
        SimulationPlan.load(path)


def test_node_config_keys_are_checked_by_name_and_server_out_dir_must_be_absolute():
    with pytest.raises(ConfigError, match=r"unknown node-config key 'domian' \(did you mean 'domain'\?\)"):
        SiteConfig.from_flower(declared_defaults(), {"domian": "fog"})
    with pytest.raises(ConfigError, match="'out-dir' must be an absolute path"):
        ServerConfig.from_run(RunConfig.read({"out-dir": "relative/dir"}))


def test_no_flat_data_key_is_declared_and_each_role_reads_its_spec_list():
    declared = tomllib.loads(app_pyproject().read_text())["tool"]["flwr"]["app"]["config"]
    assert not set(REPLACED_KEYS) & set(declared)
    run = RunConfig.read({"site-data": "dusk=camvid:/d?split=all&domain=0001TP;camvid:/d?domain=Seq05VD",
                          "source-data": "camvid:/d?split=all&domain=0016E5",
                          "eval-data": "fog=synthetic?domain=fog&n=4&seed=2;synthetic?domain=night"})  # fmt: skip
    assert [(s.name, s.spec.domain) for s in run.site_list()] == [("dusk", "0001TP"), ("Seq05VD", "Seq05VD")]
    assert run.source_spec() is not None and run.source_spec().domain == "0016E5"
    assert {name: spec.seed for name, spec in run.eval_specs().items()} == {"fog": 2, "night": 0}


def test_a_run_config_is_built_once_per_process_in_a_three_site_run_with_selection_and_recalibration(
    monkeypatch, tmp_path
):
    """The server once; each site once, on its first message, whatever number of rounds follows."""
    import torch
    from flwr.app import ArrayRecord

    from common.models.factory import build_model
    from server.strategy import OneShotMerge
    from tests.fakes import SiteGrid, fake_message, site_contexts

    built: list[RunConfig] = []
    check = RunConfig.__post_init__
    monkeypatch.setattr(RunConfig, "__post_init__", lambda self: (built.append(self), check(self))[1])
    site_data = ";".join(f"synthetic?domain={s}&n=4&size=32x48" for s in ("fog", "night", "rain"))
    run = RunConfig.read({"arch": "tiny_unet", "site-data": site_data, "batch-size": 2, "min-sites": 3,
                          "select": "label-free", "recalibrate": True, "out-dir": str(tmp_path)})  # fmt: skip
    config = ServerConfig.from_run(run, run_id=7)
    torch.manual_seed(0)
    template = build_model("tiny_unet", 9).state_dict()
    strategy = OneShotMerge(dataclasses.replace(config.merge, poll_interval=0.0), template, make_message=fake_message)
    grid = SiteGrid(site_contexts(run, (11, 22, 33), run_id=7))
    strategy.start(grid, ArrayRecord(template))
    steps = [step for _, step, _ in grid.received]
    assert steps.count("score") == 3 * len(config.merge.candidates) and steps.count("recalibrate") == 3
    assert strategy.report.recalibration["applied"] is True
    assert len(built) == 1 + 3, f"{len(built)} RunConfigs for one server and three sites"


def test_a_candidate_or_a_run_that_mixes_image_statistics_ships_a_bank_of_the_merge_s_own():
    candidates = "default; bn-image-weight=0; bn-bank=own bn-image-weight=0.5"
    run = RunConfig.read({"bn-image-weight": 0.2, "select": "label-free", "select-candidates": candidates})
    assert [(c.bank_source, c.image_weight) for c in run.candidates()] == [("merged", 0.2), ("", 0.0), ("own", 0.5)]
