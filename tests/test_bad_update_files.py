"""Update and model files as a careless user or a broken site leaves them: one clear error, nothing written."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.models.factory import build_model
from common.updates.files import load_site_update, save_site_update
from fedmerge.cli import main as cli_main
from tests.fakes import perturbed, site_update


def _save(path, site: str, seed: int = 0, **changes):
    torch.manual_seed(0)
    update = site_update(site, perturbed(build_model("tiny_unet", 4).state_dict(), seed), num_examples=5)
    save_site_update(path, update, "tiny_unet", 4)
    return path


def _rewrite(path, tensors=None, meta=None) -> None:
    """Change a saved file as a broken site would: raw safetensors, no checks."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in names}
    save_file({**old, **(tensors or {})}, str(path), metadata={**old_meta, **(meta or {})})


def _merge(tmp_path, capsys, *files) -> tuple[int, str]:
    code = cli_main(["merge", *map(str, files), "--out", str(tmp_path / "merged.safetensors")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_bytes(b"\x00" * 7), "not a readable safetensors file"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"{" + p.read_bytes()), "not a readable safetensors file"),
        (lambda p: _rewrite(p, meta={"fedmerge.format": "site-update/9"}), "unknown format 'site-update/9'"),
        (lambda p: _rewrite(p, meta={"num_examples": "abc"}), "num_examples 'abc' is not an integer"),
        (lambda p: _rewrite(p, meta={"num_examples": "-1"}), "num_examples is -1"),
        (lambda p: _rewrite(p, tensors={"classifier.1.bias": torch.full((4,), float("nan"))}), "NaN or Inf"),
        (lambda p: _rewrite(p, tensors={"classifier.1.bias": torch.zeros(7)}), "shape (7,)"),
        (lambda p: _rewrite(p, tensors={"classifier.1.bias": torch.zeros(4, dtype=torch.float64)}), "dtype"),
        (lambda p: _rewrite(p, tensors={"backbone.encoder.stem.0.1.num_batches_tracked": torch.tensor(-5)}), ">= 0"),
        (lambda p: _rewrite(p, tensors={"backbone.encoder.stem.0.1.running_var": -torch.ones(8)}), "negative"),
        (lambda p: _rewrite(p, tensors={"backbone.encoder.stem.0.1.num_samples": torch.zeros(8, dtype=torch.int64)}),
         "count n = 0"),
    ],
)  # fmt: skip
def test_a_bad_site_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, capsys, damage, message):
    good, bad = _save(tmp_path / "good.safetensors", "good"), _save(tmp_path / "bad.safetensors", "bad", 1)
    damage(bad)
    code, err = _merge(tmp_path, capsys, good, bad)
    assert code == 2 and err.count("\n") == 1, err
    assert "bad.safetensors" in err or "'bad'" in err, err
    assert message in err, err
    assert not (tmp_path / "merged.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    good = _save(tmp_path / "good.safetensors", "good")
    code = cli_main(["merge", str(good), str(path), "--out", str(tmp_path / "merged.safetensors")])
    out, err = capsys.readouterr()  # one read: stdout is where the pickled print would have written
    assert code == 2 and err.count("\n") == 1 and "evil.pt" in err and "never unpickled" in err, err
    assert "pwned" not in out and "pwned" not in err
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_checkpoint_of_another_architecture_names_the_tensor(tmp_path, capsys):
    good = _save(tmp_path / "good.safetensors", "good")
    other = tmp_path / "other.safetensors"
    update = site_update("other", build_model("tiny_unet", 7).state_dict(), num_examples=5)
    save_site_update(other, update, "tiny_unet", 7)
    code, err = _merge(tmp_path, capsys, good, other)
    assert code == 2 and "classifier" in err and "shape" in err


def test_a_site_name_in_a_file_cannot_reach_the_file_system(tmp_path):
    path = _save(tmp_path / "site.safetensors", "x")
    _rewrite(path, meta={"domain": "../../../etc/passwd"})
    update, _ = load_site_update(path)
    assert "/" not in update.site and update.site.startswith("etc")
