"""The embedded default's starting model: shipped, true to its recipe and its recorded scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.data import DataSpec, build_dataset, make_loader
from common.models.checkpoints import load_checkpoint
from common.scoring.evaluation import evaluate_domains
from server.simulation import PRESETS_DIR, SimulationPlan, starting_weights

SHIPPED = PRESETS_DIR / "synthetic-source.safetensors"
RECORD = PRESETS_DIR / "synthetic-source.json"


def test_the_demo_preset_starts_from_the_shipped_model_made_by_its_own_recipe():
    plan = SimulationPlan.preset("synthetic-3")
    assert plan.source == SHIPPED.resolve() and SHIPPED.stat().st_size < 4 * 2**20
    _, meta = load_checkpoint(SHIPPED)
    recipe = plan.pretrain
    assert recipe is not None
    recorded = (meta["arch"], meta["data"], int(meta["steps"]), int(meta["seed"]))
    assert recorded == (recipe.arch, str(recipe.data), recipe.steps, recipe.seed)


def test_the_shipped_model_scores_within_one_point_of_its_recorded_numbers():
    record = json.loads(RECORD.read_text())
    (expected,) = record["results"].values()
    model, meta = load_checkpoint(SHIPPED)
    loaders = {d: make_loader(build_dataset(DataSpec.parse(s)), 8) for d, s in record["data"].items()}
    scores, h = evaluate_domains(model, loaders, int(meta["num_classes"]))
    for domain, score in scores.items():
        assert abs(score.miou - expected["per_domain"][domain]) <= 0.01, domain
    assert math.isclose(h, expected["harmonic_mean"], abs_tol=0.01)
    assert expected["per_domain"]["source"] > 0.6  # strong on the source style, so the sites' gains show


def _tiny_plan(tmp_path: Path, source: Path | None) -> SimulationPlan:
    (tmp_path / "plan.toml").write_text(
        "num-sites = 1\n"
        + (f'source = "{source}"\n' if source else "")
        + '[pretrain]\ndata = "synthetic:?domain=source&n=4&size=32x48"\n'
        + 'arch = "tiny_unet"\nsteps = 2\nbatch-size = 2\n'
        + '[run-config]\narch = "tiny_unet"\nmin-sites = 1\n'
    )
    return SimulationPlan.load(tmp_path / "plan.toml")


def test_a_shipped_start_is_used_as_is_and_pretrain_trains_by_the_recipe_instead(tmp_path):
    plan = _tiny_plan(tmp_path, SHIPPED)
    out = tmp_path / "out"
    out.mkdir()
    assert starting_weights(plan, out, pretrain=False) == SHIPPED.resolve()
    assert not list(out.iterdir())  # nothing trained
    trained = Path(starting_weights(plan, out, pretrain=True))
    assert trained.parent == out
    _, meta = load_checkpoint(trained)
    assert meta["arch"] == "tiny_unet" and meta["steps"] == "2"


def test_a_missing_shipped_start_is_one_error_that_names_the_way_out(tmp_path):
    plan = _tiny_plan(tmp_path, tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors.*--pretrain"):
        starting_weights(plan, tmp_path, pretrain=False)
