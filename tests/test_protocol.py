"""The repeated-runs protocol: time folds that never evaluate on adapted frames, paired differences, resuming."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.data import DataSpec
from experiments.config import ExperimentConfig, ProtocolConfig
from experiments.protocol import ProtocolRun, aggregate, fold_config, fold_windows, protocol_markdown, run_protocol


@pytest.mark.parametrize("total", [40, 62, 110])
def test_fold_windows_tile_the_end_and_keep_a_gap_after_the_adapted_frames(total):
    protocol = ProtocolConfig(folds=3, gap=5, eval_fraction=0.2)
    ends = []
    for fold in range(3):
        adapt, window = fold_windows(total, protocol, fold)
        adapted, scored = adapt.select(total), window.select(total)
        assert scored.start - adapted.stop == 5  # the gap: no scored frame is a neighbour of an adapted one
        assert len(scored) == round(0.2 * total)
        ends.append(scored.stop)
    assert ends[-1] == total and ends == sorted(ends) and len(set(ends)) == 3


def test_too_many_folds_for_a_short_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to adapt on"):
        fold_windows(20, ProtocolConfig(folds=4, gap=5, eval_fraction=0.2), 0)


def _config() -> ExperimentConfig:
    raw = {
        "source": {"checkpoint": "x.safetensors"},
        "sites": [{"name": "dusk", "data": "camvid:/d?split=all&domain=0001TP&time=first:42"},
                  {"name": "day", "data": "camvid:/d?split=all&domain=Seq05VD"}],
        "eval": [{"domain": "dusk", "data": "camvid:/d?split=all&domain=0001TP&time=last:20"},
                 {"domain": "day", "data": "camvid:/d?split=all&domain=Seq05VD&time=last:30"}],
        "strategies": ["single", "gaussian"],
        "protocol": {"folds": 2, "gap": 3, "seeds": [0, 7]},
    }  # fmt: skip
    return ExperimentConfig.from_dict(raw, "t")


def test_a_fold_replaces_every_sites_and_every_evaluation_sets_frames():
    lengths = {"0001TP": 62, "Seq05VD": 110}
    config = fold_config(_config(), _config().protocol, ProtocolRun(7, 1), lambda s: lengths[s.domain])
    assert config.seed == 7 and config.name == "t/seed7-fold1"
    assert [str(s.data.time_split) for s in config.sites] == ["first:47", "first:85"]
    assert [str(e.data.time_split) for e in config.eval_sets] == ["frames:50-62", "frames:88-110"]
    # only the frames change: the reader, root, split and sequence of every spec stay the site's own
    assert config.sites[0].data == DataSpec.parse("camvid:/d?split=all&domain=0001TP&time=first:47")
    assert config.eval_sets[1].data == DataSpec.parse("camvid:/d?split=all&domain=Seq05VD&time=frames:88-110")


def _run(name: str, singles: tuple[float, float], merged: float) -> dict:
    rows = [{"label": "single:a", "name": "single", "harmonic_mean": singles[0], "per_domain": {"x": singles[0]},
             "test_time_domain": False},
            {"label": "single:b", "name": "single", "harmonic_mean": singles[1], "per_domain": {"x": singles[1]},
             "test_time_domain": False},
            {"label": "merged", "name": "merge", "harmonic_mean": merged, "per_domain": {"x": merged},
             "test_time_domain": False}]  # fmt: skip
    for row in rows:
        row["rounds"] = 1
    return {"experiment": name, "strategies": rows, "eval_sets": [{"domain": "x", "site": "x"}], "sites": []}


def test_the_paired_difference_is_taken_against_each_runs_own_best_site():
    runs = [_run("r1", (0.30, 0.20), 0.33), _run("r2", (0.25, 0.40), 0.38)]
    merged = next(r for r in aggregate(runs) if r["label"] == "merged")
    assert merged["paired"] == pytest.approx([0.03, -0.02])
    assert merged["positive_runs"] == 1 and merged["runs"] == 2
    assert merged["harmonic_mean"][0] == pytest.approx(0.355)


def test_a_labelled_single_row_is_not_a_site_the_merge_is_paired_against():
    """``single+image:<site>`` gives a site the merge's test-time normalisation; the best site stays as sent."""
    from experiments.config import _strategies

    entries = _strategies(["single", {"name": "single", "label": "single+image", "image-weight": 0.1}], ["a", "b"])
    assert [e.label for e in entries] == ["single:a", "single:b", "single+image:a", "single+image:b"]
    run = _run("r1", (0.30, 0.20), 0.33)
    run["strategies"].append({**run["strategies"][0], "label": "single+image:a", "harmonic_mean": 0.5})
    merged = next(r for r in aggregate([run]) if r["label"] == "merged")
    assert merged["paired"] == pytest.approx([0.03])


def test_finished_runs_are_read_back_and_only_missing_ones_computed(tmp_path):
    config = _config()
    done = tmp_path / "runs" / "seed0-fold0"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps(_run("t/seed0-fold0", (0.3, 0.2), 0.31)))
    computed = []

    def run_one(fold: ExperimentConfig, run_dir, cache_dir) -> dict:
        computed.append(fold.name)
        return _run(fold.name, (0.3, 0.2), 0.31)

    lengths = {"0001TP": 62, "Seq05VD": 110}
    results = run_protocol(config, tmp_path, tmp_path / "cache", run_one, lengths=lambda s: lengths[s.domain])
    assert computed == ["t/seed0-fold1", "t/seed7-fold0", "t/seed7-fold1"]
    assert [r["experiment"] for r in results] == ["t/seed0-fold0", *computed]


def test_finished_only_reports_the_runs_done_so_far_and_names_the_rest(tmp_path):
    config = _config()
    done = tmp_path / "runs" / "seed7-fold1"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps(_run("t/seed7-fold1", (0.3, 0.2), 0.31)))
    missing: list[str] = []
    lengths = {"0001TP": 62, "Seq05VD": 110}
    results = run_protocol(config, tmp_path, tmp_path / "cache", lambda *a: pytest.fail("nothing is computed"),
                           lengths=lambda s: lengths[s.domain], missing=missing)  # fmt: skip
    assert [r["experiment"] for r in results] == ["t/seed7-fold1"]
    assert missing == ["seed0-fold0", "seed0-fold1", "seed7-fold0"]
    text = protocol_markdown(config, results, missing=missing)
    assert "Partial: 1 of 4 runs; not yet run: seed0-fold0, seed0-fold1, seed7-fold0" in text
    with pytest.raises(ValueError, match="no finished protocol run"):
        protocol_markdown(config, [], missing=missing)


def test_a_protocol_without_folds_keeps_the_configs_own_sets_and_changes_only_the_seed(tmp_path):
    config = _config()
    config = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, folds=0))
    computed = []

    def run_one(run: ExperimentConfig, run_dir, cache_dir) -> dict:
        computed.append((run.name, run.seed, [str(s.data) for s in run.sites], [str(e.data) for e in run.eval_sets]))
        return _run(run.name, (0.3, 0.2), 0.31)

    run_protocol(config, tmp_path, tmp_path / "cache", run_one, lengths=lambda s: pytest.fail("no sequence is split"))
    own = ([str(s.data) for s in config.sites], [str(e.data) for e in config.eval_sets])
    assert computed == [("t/seed0", 0, *own), ("t/seed7", 7, *own)]
