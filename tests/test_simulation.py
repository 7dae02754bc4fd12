"""Real Flower simulations (SuperLink + flwr run) of the tiny preset: the spine end to end."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.merge.spec import MERGE_METHODS
from common.models.factory import build_model
from common.updates.site import bn_layer_names, split_state
from fedmerge.cli import main as cli_main
from server.simulation import SimulationPlan, run_simulation
from tests.flower_processes import command_lines, flower_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> Path:
    """The shared start as a file, so every entry point merges task vectors from the same θ₀."""
    from common.data import dataset_classes
    from common.models.checkpoints import save_checkpoint

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("initial") / "initial.safetensors"
    return save_checkpoint(build_model("tiny_unet", 9), path, "tiny_unet", dataset_classes("synthetic"))


def _simulate(out: Path, initial_weights: Path, overrides: dict, echo: io.StringIO | None = None) -> Path:
    """The tiny preset from the shared start: runs that differ only in ``overrides`` compare tensor by tensor."""
    plan = SimulationPlan.preset("tiny")
    run_simulation(plan, out, {"initial-weights": str(initial_weights), **overrides}, echo=echo)
    return out


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory, initial_weights) -> Path:
    out = tmp_path_factory.mktemp("sim-gaussian")
    echo = io.StringIO()
    started = time.time() - 1
    _simulate(out, initial_weights, {"save-updates": True}, echo)
    (out / "left-running.json").write_text(json.dumps(command_lines(flower_processes(started))))
    (out / "echoed.log").write_text(echo.getvalue())
    return out


def test_a_finished_simulation_has_stopped_every_process_when_it_returns(gaussian_run):
    """After a normal end the left-over Flower processes get a short grace, then SIGKILL (server.runtime)."""
    assert (gaussian_run / "merged.safetensors").is_file() and (gaussian_run / "report.json").is_file()
    assert json.loads((gaussian_run / "left-running.json").read_text()) == []


def test_flower_output_is_echoed_live_and_kept_in_the_run_log(gaussian_run):
    echoed = (gaussian_run / "echoed.log").read_text()
    assert echoed == (gaussian_run / ".flwr" / "run.log").read_text()
    assert sum("merged site" in line for line in echoed.splitlines()) == 3


def test_flower_takes_the_simulation_settings_from_the_run_not_deprecated_connection_options(gaussian_run):
    """The settings go by ``flwr run --federation-config``; Flower 1.41 warns about ``options.`` entries."""
    log = (gaussian_run / ".flwr" / "run.log").read_text()
    assert "deprecated" not in log
    assert "(3 simulated SuperNodes)" in log
    assert "Started a local Ray instance" not in log  # Ray's INFO lines: init-args-logging-level = ERROR took
    assert "Warning" not in log  # neither Flower's nor Ray's FutureWarning about visible devices


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_three_site_simulation_reports_counts_and_per_domain_miou(gaussian_run):
    report = _report(gaussian_run)
    assert report["status"] == "ok"
    assert sorted(s["domain"] for s in report["sites"]) == ["fog", "night", "rain"]
    for site in report["sites"]:
        assert site["num_examples"] == 6
        assert site["bn_values"] == 6 * 32 * 48  # first BN layer sees every pixel of every image
    ev = report["eval"]
    assert set(ev["per_domain"]) == {"fog", "night", "rain"}
    assert all(0.0 <= v <= 1.0 for v in ev["per_domain"].values())
    values = list(ev["per_domain"].values())
    assert ev["harmonic_mean"] == pytest.approx(len(values) / sum(1 / v for v in values))
    assert set(report["eval_sites"]) == {"fog", "night", "rain"} and report["eval_initial"]["per_domain"]


def test_every_reply_holds_only_parameters_buffers_counts_scalars_and_domain(gaussian_run):
    report = _report(gaussian_run)
    model_state = build_model("tiny_unet", 9).state_dict()
    params, buffers = split_state(model_state)
    layers = bn_layer_names(model_state)
    for site in report["sites"]:
        m = site["manifest"]
        assert set(m) == {"params", "buffers", "counts", "info", "metrics"}
        assert m["params"]["type"] == "ArrayRecord" and m["params"]["keys"] == sorted(params)
        assert m["buffers"]["type"] == "ArrayRecord" and m["buffers"]["keys"] == sorted(buffers)
        assert m["counts"]["keys"] == sorted(["num-examples", *[f"bn:{layer}" for layer in layers]])
        assert set(m["counts"]["value_types"]) <= {"int", "list"}
        assert m["info"]["items"] == {"domain": site["domain"], "method": "adabn"}
        assert m["metrics"]["value_types"] == ["float"]


def _received(run: Path) -> list[Path]:
    updates = sorted((run / "updates").glob("*.safetensors"), key=lambda p: p.stem.split("-", 2)[2])
    assert [p.stem.split("-", 2)[2] for p in updates] == ["fog", "night", "rain"]  # node-<id>-<domain>
    return updates


_REQUIRED_OPTIONS = {"layerwise": "anchor=fog"}  # a method whose options have no default


def _merge_and_compare(method: str, files: list[Path], initial_weights: Path, out: Path) -> list[dict]:
    """What ``fedmerge merge`` and compare's merge row make of the received updates."""
    from common.models.checkpoints import read_model_file
    from common.updates.files import load_site_update
    from experiments.strategies import MergeInputs, get_strategy, make_options

    options = _REQUIRED_OPTIONS.get(method, "")
    flags = ["--option", options] if options else []
    assert cli_main(["merge", *map(str, files), "--method", method, *flags, "--base", str(initial_weights),
                     "--out", str(out)]) == 0  # fmt: skip
    updates = [load_site_update(f)[0] for f in files]
    strategy, _ = get_strategy("merge")
    inputs = MergeInputs(read_model_file(initial_weights).state, updates, updates, {}, {u.site: 0.0 for u in updates})
    compared = strategy.load()(inputs, make_options(strategy, {"method": method, "options": options}))
    return [load_file(str(out)), compared.state]


def _assert_bit_identical(states: list[dict]) -> None:
    first, *others = states
    for other in others:
        assert first.keys() == other.keys()
        for key in first:
            assert torch.equal(first[key], other[key]), key


def test_flowers_merge_is_bit_identical_to_fedmerge_merge_and_compare_of_the_received_updates(
    gaussian_run, initial_weights, tmp_path
):
    flower = load_file(str(gaussian_run / "merged.safetensors"))
    _assert_bit_identical(
        [flower, *_merge_and_compare("linear", _received(gaussian_run), initial_weights, tmp_path / "m.safetensors")]
    )


def _with_task_vectors(files: list[Path], out: Path) -> list[Path]:
    """The received updates with seeded task vectors added: AdaBN sites send the start's parameters back,
    and on τ = 0 every method gives θ₀, so the methods could not be told apart on the updates as carried."""
    import dataclasses

    from common.updates.files import load_site_update, save_site_update

    out.mkdir()
    moved = []
    for i, path in enumerate(files):
        update = load_site_update(path)[0]
        gen = torch.Generator().manual_seed(i)
        params = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in update.params.items()}
        moved.append(save_site_update(out / path.name, dataclasses.replace(update, params=params), "tiny_unet", 9))
    return moved


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_merge_method_gives_the_same_bits_in_the_strategy_in_fedmerge_merge_and_in_compare(
    method, gaussian_run, initial_weights, tmp_path
):
    """Transport does not depend on the method (the real run above checks it): the ServerApp's strategy,
    fed the replies Flower carried (with task vectors), merges as ``fedmerge merge`` and compare do."""
    from common.models.checkpoints import read_model_file
    from common.updates.files import load_site_update
    from server.config import ServerConfig
    from server.strategy import OneShotMerge
    from tests.fakes import fake_message, reply_of

    files = _with_task_vectors(_received(gaussian_run), tmp_path / "updates")
    overrides = {"merge-method": method, "merge-options": _REQUIRED_OPTIONS.get(method, ""),
                 "initial-weights": str(initial_weights), "out-dir": str(tmp_path)}  # fmt: skip
    merge = ServerConfig.from_run(SimulationPlan.preset("tiny").resolve(overrides)).merge
    strategy = OneShotMerge(merge, read_model_file(initial_weights).state, make_message=fake_message)
    arrays, _ = strategy.aggregate_train(1, [reply_of(load_site_update(f)[0], i) for i, f in enumerate(files)])
    assert arrays is not None
    served = arrays.to_torch_state_dict()
    _assert_bit_identical([served, *_merge_and_compare(method, files, initial_weights, tmp_path / "m.safetensors")])
    if method != "linear":  # the methods really differ on these updates
        linear = _merge_and_compare("linear", files, initial_weights, tmp_path / "l.safetensors")[0]
        assert any(not torch.equal(served[k], linear[k]) for k in linear if k.endswith("weight"))


@pytest.fixture(scope="module")
def recalibrated_run(tmp_path_factory, initial_weights) -> Path:
    return _simulate(tmp_path_factory.mktemp("sim-recalibrated"), initial_weights, {"recalibrate": True})


def test_recalibration_round_replaces_bn_statistics_only(gaussian_run, recalibrated_run):
    tmp_path = recalibrated_run
    report = _report(tmp_path)
    assert report["recalibration"]["applied"] is True
    assert sorted(report["recalibration"]["sites"]) == ["fog", "night", "rain"]
    plain, recal = load_file(str(gaussian_run / "merged.safetensors")), load_file(str(tmp_path / "merged.safetensors"))
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert any(not torch.equal(plain[k], recal[k]) for k in stats)
    for key in plain:
        if key not in stats:
            assert torch.equal(plain[key], recal[key]), key


def test_a_secure_simulation_gives_the_plain_merge_within_the_stated_bound(recalibrated_run, initial_weights, tmp_path):
    """Real Flower carries both secure rounds (the masked merge, then the masked recalibration sums), and the
    result equals the plain recalibrated run's (same sites, same data) within the stated bound. The first
    round's BN pooling by secure sums, which recalibration replaces here, is checked against the plain
    merge in process with the real ClientApp handlers in tests/test_secure_aggregation.py."""
    _simulate(tmp_path, initial_weights, {"secure-aggregation": True, "recalibrate": True})
    report = _report(tmp_path)
    assert report["status"] == "ok" and report["secure"]["merge"]["relative_error_bound"] < 1e-12
    assert sorted(s["domain"] for s in report["sites"]) == ["fog", "night", "rain"]
    assert len(report["secure"]["merge"]["survivors"]) == 3 and report["secure"]["merge"]["threshold"] == 3
    assert report["recalibration"]["applied"] is True
    plain = load_file(str(recalibrated_run / "merged.safetensors"))
    secure = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in plain.items():
        scale = float(value.double().abs().max()) or 1.0
        assert float((secure[key].double() - value.double()).abs().max()) <= 1e-6 * scale, key


def test_a_label_free_selection_runs_in_flower_and_its_choice_is_the_merged_model(tmp_path):
    """Every candidate goes to the sites; only scalar scores come back; the chosen one is merged.safetensors."""
    from common.config.run import RunConfig
    from common.merge.engine import MergeEngine
    from common.updates.files import load_site_update

    plan = SimulationPlan.preset("tiny")
    overrides = {"select": "label-free", "save-updates": True}
    run = plan.resolve(overrides)
    run_simulation(plan, tmp_path, overrides)
    report = _report(tmp_path)
    selection = report["selection"]
    assert selection["chosen"] in selection["candidates"] and len(selection["candidates"]) == 4
    assert len(selection["replies"]) == 3 * len(selection["candidates"])  # every site scored every candidate
    for reply in selection["replies"]:
        assert set(reply["manifest"]) == {"scores", "info"}  # scalars and the site's label, nothing else
        assert reply["manifest"]["scores"]["value_types"] == ["float"]
        assert "agreement" in reply["scores"]
    chosen = next(c for c in run.candidates() if c.label == selection["chosen"])
    updates = sorted((tmp_path / "updates").glob("*.safetensors"))
    torch.manual_seed(run.seed)
    template = build_model(run.arch, run.num_classes).state_dict()
    engine = MergeEngine(chosen.spec, template)
    for path in updates:
        engine.ingest(load_site_update(path)[0])
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in engine.result().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    assert RunConfig.defaults().select == ""  # selection is asked for, not the default


CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


@pytest.mark.skipif(not (CAMVID / "trainannot").is_dir(), reason=f"CamVid not found at {CAMVID}")
def test_a_simulation_names_its_sites_and_evaluation_sets_by_camvid_data_specs(tmp_path):
    """site-data and eval-data are spec lists: partition i adapts on item i, each named by its label."""
    import dataclasses

    def spec(name: str, domain: str, n: int) -> str:
        return f"{name}=camvid:{CAMVID}?split=all&domain={domain}&n={n}&size=36x48"

    plan = dataclasses.replace(SimulationPlan.preset("tiny"), num_sites=2)
    run_simulation(plan, tmp_path, {
        "num-classes": 11, "min-sites": 2, "site-data": f"{spec('dusk', '0001TP', 4)};{spec('day', 'Seq05VD', 4)}",
        "eval-data": f"{spec('dusk', '0001TP', 3)};{spec('day', 'Seq05VD', 3)}", "eval-sites": False,
    })  # fmt: skip
    report = _report(tmp_path)
    assert sorted(s["domain"] for s in report["sites"]) == ["day", "dusk"]
    assert {s["num_examples"] for s in report["sites"]} == {4}
    assert sorted(report["eval"]["per_domain"]) == ["day", "dusk"]
