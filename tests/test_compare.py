"""The comparison pipeline: pool and cache, configs, result files, the FedAvg baseline's aggregation."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from clients.adaptation import METHODS, AdaptContext
from clients.adaptation.configs import MethodConfig
from clients.site import SiteJob, adapt_site
from common.data import build_dataset
from common.models.checkpoints import save_checkpoint
from common.models.factory import build_model
from common.models.segmenter import Segmenter
from common.updates.site import bn_layer_names, split_state
from experiments.compare import run_compare
from experiments.config import CONFIGS_DIR, ExperimentConfig, list_configs, resolve_config_path
from experiments.pool import EMA_FROM_TRAIN_PASS, ModelPool, load_source
from experiments.strategies import get_strategy, make_options
from fedmerge.cli import main as cli_main
from server.fedavg import BNFedAvg
from server.report import MergeReport
from server.rounds.base import MinSitesNotMet
from tests.fakes import error_reply, merge_config, reply_of, site_update

SIZE = "16x24"
ADAPTED: list[str] = []  # sites the counting method ran on, in order


@METHODS.register("test-counting", target="tests.test_compare:counting",
                  summary="test only: moves every conv weight and records the call")  # fmt: skip
@dataclass(frozen=True)
class CountingConfig(MethodConfig):
    shift: float = 0.01


def counting(model: Segmenter, target: Dataset, context: AdaptContext, config: CountingConfig) -> None:
    ADAPTED.append(f"{len(target)}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.add_(config.shift * (1 + len(target)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("source") / "source.safetensors"
    return save_checkpoint(build_model("tiny_unet", 9), path, "tiny_unet", [f"c{i}" for i in range(9)])


def _raw(checkpoint: Path, method: str = "test-counting", strategies=None, options=None) -> dict:
    def spec(style: str, n: int, seed: int) -> str:
        return f"synthetic?domain={style}&n={n}&seed={seed}&size={SIZE}"

    return {
        "seed": 0,
        "source": {"checkpoint": str(checkpoint)},
        "method": {"name": method, "batch-size": 2, "options": options or {}},
        "sites": [{"name": "fog", "data": spec("fog", 2, 1)}, {"name": "night", "data": spec("night", 4, 1)}],
        "eval": [{"domain": "fog", "data": spec("fog", 2, 2)}, {"domain": "night", "data": spec("night", 2, 2)}],
        "lmc": {"points": 3},
        "strategies": strategies or ["source-only", "single", "gaussian", "data-combination"],
    }


def test_the_pool_builds_the_update_adapt_site_builds_and_keeps_ema_statistics(checkpoint, tmp_path):
    config = ExperimentConfig.from_dict(_raw(checkpoint, method="adabn"), "t")
    source = load_source(config.source, tmp_path)
    target = build_dataset(config.sites[1].data)
    entry = ModelPool(source, config.method, config.seed, tmp_path).get("night", target, str(config.sites[1].data))
    direct = adapt_site(source.model(), target, SiteJob("night", "adabn", batch_size=2))
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(entry.update.state_dict()[key], value, rtol=0, atol=0)
    for layer, n in direct.counts.items():
        assert torch.equal(entry.update.counts[layer], n)
    # adabn trains nothing: the pool records what one PyTorch train-mode pass leaves (two batches of two)
    assert entry.ema_note == EMA_FROM_TRAIN_PASS
    layer = bn_layer_names(source.state)[0]
    assert (
        int(entry.ema_buffers[f"{layer}.num_batches_tracked"]) == int(source.state[f"{layer}.num_batches_tracked"]) + 2
    )
    assert not torch.allclose(entry.ema_buffers[f"{layer}.running_var"], entry.update.buffers[f"{layer}.running_var"])


def test_a_second_run_reuses_every_cached_update_and_gives_the_same_table(checkpoint, tmp_path):
    ADAPTED.clear()
    config = ExperimentConfig.from_dict(_raw(checkpoint), "t")
    first = run_compare(config, tmp_path / "cache")
    assert sorted(ADAPTED) == ["2", "4", "6"]  # fog, night, and the data combination of both
    assert first.adapted_now == 3 and not any(s.cached for s in first.sites)
    second = run_compare(config, tmp_path / "cache")
    assert sorted(ADAPTED) == ["2", "4", "6"]  # nothing adapted twice
    assert second.adapted_now == 0 and all(s.cached for s in second.sites)
    for a, b in zip(first.rows, second.rows, strict=True):
        assert (a.label, a.per_domain, a.harmonic_mean, a.bytes_sent) == (b.label, b.per_domain, b.harmonic_mean,
                                                                         b.bytes_sent)  # fmt: skip
    # a different option is a different update
    changed = ExperimentConfig.from_dict(_raw(checkpoint, options={"shift": 0.02}), "t")
    run_compare(changed, tmp_path / "cache")
    assert len(ADAPTED) == 6


def test_compare_command_writes_results_and_plots(checkpoint, tmp_path):
    strategies = ["source-only", "single", "average", "params-only", "reference", "gaussian", "gaussian-equal",
                  "recalibrate", "weighted", {"name": "task-arithmetic", "lambda": 0.5, "label": "ta-0.5"},
                  "ties", "fedbn", "separate-heads"]  # fmt: skip
    raw = _raw(checkpoint, strategies=strategies)
    import tomli_w

    config_path = tmp_path / "tiny.toml"
    config_path.write_text(tomli_w.dumps(raw))
    out = tmp_path / "out"
    assert cli_main(["compare", "--config", str(config_path), "--out-dir", str(out)]) == 0
    for name in ("results.json", "results.csv", "results.md", "strategies.png", "lmc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["strategies"]]
    assert labels[:3] == ["source-only", "single:fog", "single:night"] and "ta-0.5" in labels
    rows = {r["label"]: r for r in results["strategies"]}
    update_bytes = {s["name"]: s["update_bytes"] for s in results["sites"]}
    assert rows["source-only"]["bytes_sent"] == {} and rows["source-only"]["rounds"] == 0
    assert rows["gaussian"]["bytes_sent"] == update_bytes and rows["gaussian"]["rounds"] == 1
    assert rows["recalibrate"]["rounds"] == 2
    assert all(rows["recalibrate"]["bytes_sent"][s] > update_bytes[s] for s in update_bytes)
    assert rows["fedbn"]["test_time_domain"] and not rows["gaussian"]["test_time_domain"]
    for row in results["strategies"]:
        values = list(row["per_domain"].values())
        assert row["harmonic_mean"] == pytest.approx(len(values) / sum(1 / v for v in values))
    assert len(results["lmc"]["alphas"]) == 3
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == labels and "miou:night" in table[0] and "bytes:fog" in table[0]
    md = (out / "results.md").read_text()
    assert all(f"| {label} |" in md for label in labels)
    assert "| fedbn | needed |" in md and "![strategies.png](strategies.png)" in md


def test_shipped_configs_load_and_name_registered_strategies():
    assert {
        "synthetic-4",
        "camvid-daydusk",
        "camvid-3",
        "camvid-c",
        "cityscapes-idd",
        "cityscapes-idd-acdc-darkzurich",
    } <= set(list_configs())
    for name in list_configs():
        config = ExperimentConfig.load(CONFIGS_DIR / f"{name}.toml", data_root="/nonexistent/data")
        assert resolve_config_path(name) == CONFIGS_DIR / f"{name}.toml"
        for entry in config.strategies:
            strategy, implied = get_strategy(entry.name)
            make_options(strategy, {**implied, **entry.options})
        assert config.lmc is not None
        sites = {s.name for s in config.sites}
        assert all(e.site in sites for e in config.eval_sets), name


def test_a_config_with_a_data_root_placeholder_asks_for_one(tmp_path):
    raw = {"source": {"checkpoint": "x"}, "sites": [{"name": "a", "data": "camvid:{data_root}?domain=0001TP"}],
           "eval": [{"domain": "a", "data": "synthetic"}], "strategies": ["gaussian"]}  # fmt: skip
    with pytest.raises(ValueError, match="--data-root"):
        ExperimentConfig.from_dict(raw, "t")
    assert ExperimentConfig.from_dict(raw, "t", data_root=str(tmp_path)).sites[0].data.root == str(tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        ExperimentConfig.from_dict({**raw, "strategy": []}, "t", data_root=str(tmp_path))


def _site_update(site: str, template: dict, n: int, scale: float):
    state = {k: (v * 0 + scale) if v.is_floating_point() else v.clone() for k, v in template.items()}
    return site_update(site, state, num_examples=n)


def test_fedavg_baseline_weights_parameters_by_examples_and_keeps_integer_buffers():
    template = build_model("tiny_unet", 9).state_dict()
    report = MergeReport()
    strategy = BNFedAvg(template, merge_config(min_sites=2), report)
    replies = [reply_of(_site_update("a", template, 1, 1.0), 1), reply_of(_site_update("b", template, 3, 3.0), 2),
               error_reply(3, 2, "boom")]  # fmt: skip
    for r in replies:
        r.src_node_id = int(r.src_node_id)
    arrays, metrics = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    params, _ = split_state(template)
    for key in params:
        torch.testing.assert_close(state[key], torch.full_like(template[key], 2.5))  # (1·1 + 3·3) / 4
    layer = bn_layer_names(template)[0]
    assert state[f"{layer}.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(state[f"{layer}.running_mean"], torch.full_like(template[f"{layer}.running_mean"], 2.5))
    assert int(metrics["sites"]) == 2 and [s.domain for s in report.sites] == ["a", "b"]
    assert all(s.bytes_received > 0 and s.metrics["round"] == 1.0 for s in report.sites)
    assert [i.kind for i in report.incidents] == ["failed"]
    with pytest.raises(MinSitesNotMet):
        strategy.aggregate_train(2, [reply_of(_site_update("a", template, 1, 1.0), 1)])


@pytest.mark.slow
def test_fedavg_rounds_runs_in_flowers_simulation(checkpoint, tmp_path):
    """The baseline for real: a SuperLink, two SuperNodes, the ClientApp and the FedAvg ServerApp."""
    raw = _raw(checkpoint, method="adabn", strategies=[{"name": "fedavg-rounds", "rounds": 2}, "gaussian"])
    result = run_compare(ExperimentConfig.from_dict(raw, "t"), tmp_path / "cache")
    fedavg, gaussian = result.rows
    assert fedavg.rounds == 2
    assert fedavg.bytes_sent == {s: 2 * b for s, b in gaussian.bytes_sent.items()}
    assert all(0.0 <= v <= 1.0 for v in fedavg.per_domain.values())
    report = json.loads(next((tmp_path / "cache" / "fedavg").glob("*/report.json")).read_text())
    assert report["config"]["strategy"] == "fedavg" and report["config"]["num_rounds"] == 2
    assert sorted((s["domain"], s["metrics"]["round"]) for s in report["sites"]) == [
        ("fog", 1.0), ("fog", 2.0), ("night", 1.0), ("night", 2.0)
    ]  # fmt: skip
