"""Experiment configs: every strategy, option and site key is checked when the file is read, before any training."""

from __future__ import annotations

import pytest

from experiments.config import ExperimentConfig
from fedmerge.cli import main as cli_main

BASE = {
    "source": {"pretrain": {"data": "synthetic:?domain=source&n=4&size=16x16", "arch": "tiny_unet", "steps": 1}},
    "method": {"name": "adabn"},
    "sites": [{"name": "fog", "data": "synthetic:?domain=fog&n=2&size=16x16"}],
    "eval": [{"domain": "fog", "data": "synthetic:?domain=fog&n=2&size=16x16"}],
    "strategies": ["gaussian"],
}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"strategies": ["gausian"]}, "unknown strategy 'gausian' (did you mean 'gaussian'?)"),
        ({"strategies": [{"name": "ties", "topk": 0.1}]}, "strategy 'ties' has no option 'topk'"),
        ({"strategies": [{"name": "ties", "k": 3.0}]}, "k (fraction of entries kept) must be in (0, 1]"),
        ({"strategies": [{"name": "ties", "buffers": "gausian"}]}, "buffer-mode must be one of"),
        ({"strategies": [{"name": "merge", "method": "tie"}]}, "unknown merge method 'tie'"),
        ({"strategies": [{"name": "recalibrate", "mode": "bach"}]}, "mode must be batch or eval"),
        ({"strategies": [{"label": "no name"}]}, "a strategy is a name or a table with a 'name'"),
        ({"sites": "fog"}, "sites must be a list of tables ([[sites]] entries), not 'fog'"),
        ({"sites": [{"name": "fog", "dat": "synthetic"}]}, "[[sites]] #1: unknown keys ['dat'] (did you mean 'data'?)"),
        ({"sites": [{"name": "fog"}]}, "[[sites]] #1: missing ['data']"),
        ({"eval": [{"domain": "fog", "data": "synthetic", "sight": "x"}]}, "[[eval]] #1: unknown keys ['sight']"),
        ({"method": {"name": "selftrain", "options": {"stepz": 3}}}, "method 'selftrain' has no option 'stepz'"),
        ({"method": {"name": "selftrian"}}, "unknown adaptation method 'selftrian' (did you mean 'selftrain'?)"),
        ({"method": {"name": "tent", "options": {"steps": "many"}}}, "option 'steps' must be an integer"),
    ],
)
def test_a_bad_experiment_config_is_refused_when_read(change, message):
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_dict({**BASE, **change}, "t")
    assert message in str(info.value)


def test_compare_stops_before_any_training_on_a_misspelt_strategy(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(
        'strategies = ["gaussian", "tiez"]\n'
        '[source.pretrain]\ndata = "synthetic:?domain=source&n=4"\narch = "tiny_unet"\nsteps = 1\n'
        '[method]\nname = "adabn"\n[[sites]]\nname = "fog"\ndata = "synthetic:?domain=fog&n=2"\n'
        '[[eval]]\ndomain = "fog"\ndata = "synthetic:?domain=fog&n=2"\n'
    )
    assert cli_main(["compare", "--config", str(config), "--out-dir", str(tmp_path / "out")]) == 2
    assert "unknown strategy 'tiez' (did you mean 'ties'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no source pretrained, no site adapted, nothing written
