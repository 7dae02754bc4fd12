"""The site-update file format, plain PyTorch fallbacks, and clear errors on bad files."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.models.factory import build_model
from common.updates.files import FORMAT, load_site_update, save_site_update
from common.updates.site import SiteUpdate
from fedmerge.cli import main as cli_main
from tests.fakes import site_update


def _update(site: str = "dusk", scale: float = 0.0) -> SiteUpdate:
    torch.manual_seed(0)
    state = build_model("tiny_unet", 4).state_dict()
    state = {k: v + scale if v.is_floating_point() and not k.endswith("running_var") else v for k, v in state.items()}
    return site_update(site, state, num_examples=12, per_image=7)


def test_round_trip_keeps_tensors_counts_and_metadata(tmp_path):
    update = _update()
    path = tmp_path / "dusk.safetensors"
    save_site_update(path, update, "tiny_unet", 4)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["fedmerge.format"] == FORMAT and meta["arch"] == "tiny_unet" and meta["domain"] == "dusk"
    assert all(f"{layer}.num_samples" in keys for layer in update.counts)
    loaded, _ = load_site_update(path)
    assert loaded.site == "dusk" and loaded.num_examples == 12
    for key, value in update.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert all(torch.equal(loaded.counts[k], v) for k, v in update.counts.items())


def test_plain_torch_state_dict_falls_back_to_num_batches_tracked(tmp_path, caplog):
    state = build_model("tiny_unet", 4).state_dict()
    state = {k: torch.tensor(5) if k.endswith("num_batches_tracked") else v for k, v in state.items()}
    path = tmp_path / "site.pt"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        update, _ = load_site_update(path)
    assert "num_batches_tracked" in caplog.text
    assert all(int(n) == 5 for n in update.counts.values())
    assert update.site == "site"


def test_corrupt_file_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        load_site_update(path)


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model("tiny_unet", 7).state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pt.*shape"):
        build_model("tiny_unet", 4, weights=path)


def test_cli_merge_refuses_a_nan_update_naming_site_and_tensor(tmp_path, capsys):
    good, bad = _update("day"), _update("dusk")
    key = next(iter(bad.params))
    bad.params[key] = bad.params[key].clone()
    bad.params[key].view(-1)[0] = float("nan")
    save_site_update(tmp_path / "day.safetensors", good, "tiny_unet", 4)
    save_site_update(tmp_path / "dusk.safetensors", _update("dusk"), "tiny_unet", 4)
    with safe_open(str(tmp_path / "dusk.safetensors"), framework="pt") as f:  # what a broken site would write
        names = list(f.keys())
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in names}
    tensors[key] = bad.params[key]
    save_file(tensors, str(tmp_path / "dusk.safetensors"), metadata=meta)
    code = cli_main(
        [
            "merge",
            str(tmp_path / "day.safetensors"),
            str(tmp_path / "dusk.safetensors"),
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "dusk" in err and key in err and "NaN" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_merge_with_count_weights(tmp_path):
    from safetensors.torch import load_file

    a, b = _update("a", 0.0), _update("b", 1.0)
    b.num_examples = 36  # a has 12: weights 1/4 and 3/4
    b.counts = {k: v * 3 for k, v in b.counts.items()}
    for u in (a, b):
        save_site_update(tmp_path / f"{u.site}.safetensors", u, "tiny_unet", 4)
    files = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    key = next(iter(a.params))
    uncapped, capped = tmp_path / "uncapped.safetensors", tmp_path / "capped.safetensors"
    assert cli_main(["merge", *files, "--out", str(uncapped), "--weights", "counts", "--max-site-share", "1"]) == 0
    torch.testing.assert_close(load_file(str(uncapped))[key], a.params[key] + 0.75)
    # by default no site holds more than half the weight: with two sites, counts cannot tilt the merge
    assert cli_main(["merge", *files, "--out", str(capped), "--weights", "counts"]) == 0
    torch.testing.assert_close(load_file(str(capped))[key], a.params[key] + 0.5)
