"""Label-free scores: what each measures, and how a comparison's rows are ranked and picked by them."""

from __future__ import annotations

import math

import pytest
import torch

from common.config.run import ConfigError, RunConfig
from common.models.factory import build_model
from common.scoring.label_free import label_free_scores, score_images
from common.scoring.scores import SCORES
from experiments.selection import selection_rows, spearman
from server.rounds.select import aggregate_scores


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(3, 3, 32, 48) for _ in range(2)]


class Fixed(torch.nn.Module):
    """Logits that ignore the image: every pixel's prediction is set by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits  # [C, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


class Brightness(torch.nn.Module):
    """Class 1 where a pixel is brighter than mid-grey: its labels move with a brightness change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = 10 * (x.mean(1, keepdim=True) - 0.5)
        return torch.cat([-bright, bright], 1)


def test_each_score_on_models_whose_answer_is_known(images):
    uniform = Fixed(torch.zeros(5, 32, 48))
    scores = label_free_scores(uniform, uniform, images)
    assert set(scores) == set(SCORES)
    assert scores["neg-entropy"] == pytest.approx(-1.0) and scores["diversity"] == pytest.approx(1.0)
    assert scores["confident"] == 0.0 and scores["agreement"] == 1.0
    assert scores["photometric"] == 1.0 and scores["mix"] == 1.0  # the image changes nothing it says
    sure = Fixed(torch.zeros(5, 32, 48).index_fill_(0, torch.tensor([2]), 50.0))
    scores = label_free_scores(sure, uniform, images)
    assert scores["confident"] == 1.0 and scores["neg-entropy"] == pytest.approx(0.0, abs=1e-6)
    assert scores["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert scores["agreement"] == 0.0  # uniform's arg-max is class 0 everywhere, sure says 2
    halves = torch.zeros(5, 32, 48)
    halves[1, :, 24:] = 1.0  # class 1 on the right half, class 0 on the left
    assert label_free_scores(Fixed(halves), uniform, images)["agreement"] == pytest.approx(0.5)
    by_brightness = label_free_scores(Brightness(), None, images)
    assert "agreement" not in by_brightness  # no site model: no agreement
    assert by_brightness["photometric"] < 0.9  # darker by 0.3: many bright pixels turn dark


def test_the_default_score_prefers_the_sharper_of_two_candidates_that_agree(images):
    """Same classes everywhere, one candidate sure and one hesitant: the shipped ``confident`` score
    ranks the sure one first at every site, and so does the worst-site aggregate the server uses."""
    default = RunConfig.defaults().select_score
    assert default == "confident"
    torch.manual_seed(4)
    hesitant = build_model("tiny_unet", 5).eval()
    sure = build_model("tiny_unet", 5).eval()
    sure.load_state_dict(hesitant.state_dict())
    with torch.no_grad():
        sure.final_layer().weight.mul_(200.0)
        sure.final_layer().bias.mul_(200.0)
    sites = [images[:1], images[1:]]
    values = {
        name: [label_free_scores(model, hesitant, site)[default] for site in sites]
        for name, model in (("hesitant", hesitant), ("sure", sure))
    }
    assert label_free_scores(sure, hesitant, images)["agreement"] == 1.0  # the same arg-max everywhere
    assert all(s > h for s, h in zip(values["sure"], values["hesitant"], strict=True)), values
    worst = {name: aggregate_scores(v, "worst") for name, v in values.items()}
    assert max(worst, key=worst.__getitem__) == "sure"


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
