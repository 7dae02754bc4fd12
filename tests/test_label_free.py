"""Label-free scores: what each measures, and how a comparison's rows are ranked and picked by them."""

from __future__ import annotations

import math

import pytest
import torch

from common.label_free import SCORES, label_free_scores, score_images
from common.model_factory import build_model
from common.run_config import ConfigError, RunConfig
from experiments.selection import selection_rows, spearman
from server.selection_round import aggregate_scores


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(3, 3, 32, 48) for _ in range(2)]


def test_every_score_is_computed_and_a_model_agrees_fully_with_itself(images):
    torch.manual_seed(1)
    model = build_model("tiny_unet", 5).eval()
    scores = label_free_scores(model, model, images)
    assert set(scores) == set(SCORES)
    assert scores["agreement"] == 1.0
    assert -1.0 <= scores["neg-entropy"] <= 0.0 and 0.0 <= scores["diversity"] <= 1.0
    assert 0.0 <= scores["mix"] <= 1.0 and 0.0 <= scores["photometric"] <= 1.0
    assert "agreement" not in label_free_scores(model, None, images)  # no site model: no agreement


def test_a_collapsed_model_scores_low_diversity(images):
    torch.manual_seed(2)
    model = build_model("tiny_unet", 5).eval()
    collapsed = build_model("tiny_unet", 5).eval()
    with torch.no_grad():
        collapsed.final_layer().bias.copy_(torch.tensor([50.0, 0, 0, 0, 0]))
    assert label_free_scores(collapsed, None, images)["diversity"] < label_free_scores(model, None, images)["diversity"]


def test_scores_read_at_most_sixteen_evenly_spaced_images():
    data = list(range(100))
    picked = score_images(data)  # type: ignore[arg-type]
    assert len(picked) == 16 and picked.indices == list(range(0, 96, 6))


def test_spearman_and_the_picks_of_a_comparison():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and math.isnan(spearman([1, 1], [1, 2]))
    rows = [
        {"label": "merge", "name": "merge", "rounds": 1, "test_time_domain": False, "harmonic_mean": 0.30,
         "label_free": {"agreement": {"a": 0.5, "b": 0.7}}},
        {"label": "bank", "name": "merge", "rounds": 1, "test_time_domain": False, "harmonic_mean": 0.35,
         "label_free": {"agreement": {"a": 0.9, "b": 0.6}}},
        {"label": "single:a", "name": "single", "rounds": 1, "test_time_domain": False, "harmonic_mean": 0.2,
         "label_free": {"agreement": {"a": 1.0, "b": 0.9}}},
    ]  # fmt: skip
    [row] = selection_rows(rows)
    assert row["pick"] == "bank" and row["best"] == "bank" and row["default_h"] == 0.30  # worst site: 0.6 > 0.5
    assert aggregate_scores([0.2, float("nan"), 0.5], "worst") == 0.2
    assert aggregate_scores([0.2, 0.4], "mean") == pytest.approx(0.3)


def test_selection_candidates_are_checked_when_the_config_is_read():
    assert len(RunConfig.read({"select": "label-free"}).candidates()) == 4
    with pytest.raises(ConfigError, match=r"only .* can change"):
        RunConfig.read({"select": "label-free", "select-candidates": "default; min-sites=3"})
    with pytest.raises(ConfigError, match="select-score must be one of"):
        RunConfig.read({"select": "label-free", "select-score": "vibes"})
    with pytest.raises(ConfigError, match="not with secure-aggregation"):
        RunConfig.read({"select": "label-free", "secure-aggregation": True})
