"""Command-line flags as a careless user types them: one line naming the problem, exit 2, nothing started or lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.models.factory import build_model
from common.updates.files import save_site_update
from fedmerge.cli import main as cli_main
from tests.fakes import site_update

FEDMERGE = Path(sys.executable).parent / "fedmerge"


@pytest.mark.parametrize(
    "setting,message",
    [
        ("recalibrate=False", "'recalibrate' must be true or false, not 'False'"),
        ("save-updates=no", "'save-updates' must be true or false, not 'no'"),
        ("min-sites=abc", "'min-sites' must be an integer, not 'abc'"),
        ("min-site=2", "unknown run-config key 'min-site' (did you mean 'min-sites'?)"),
        ("min-sites=4", "min-sites = 4 is more than the 3 simulated sites"),
        ("merge-method=tie", "unknown merge method 'tie'"),
    ],
)
def test_simulate_refuses_a_bad_setting_before_starting_flower(tmp_path, setting, message):
    """In a fresh interpreter, as a user runs it: nothing of Flower starts, no output folder appears."""
    out = tmp_path / "run"
    result = subprocess.run(
        [str(FEDMERGE), "simulate", "--preset", "tiny", "--out-dir", str(out), "--set", setting],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_data_synth_refuses_a_non_empty_folder_and_overwrite_empties_it(tmp_path, capsys):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    args = ["data", "synth", "--out", str(out), "--images-per-domain", "1", "--styles", "fog", "--size", "8x8"]
    assert cli_main(args) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "stale.png").exists()  # nothing lost
    assert cli_main([*args, "--overwrite"]) == 0
    assert not (out / "stale.png").exists() and (out / "fog").is_dir()


@pytest.mark.parametrize("names", ["a\nb", "../x", ".hidden", "a b", "x" * 65])
def test_deploy_keys_refuse_a_name_that_is_not_a_plain_label(tmp_path, capsys, names):
    assert cli_main(["deploy", "keys", "--out", str(tmp_path / "keys"), "--names", names]) == 2
    assert "key name" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists() or not list((tmp_path / "keys").iterdir())


def test_folder_data_of_mixed_image_sizes_names_a_file_of_each_size(tmp_path, capsys):
    for size in ("8x8", "16x12"):
        out = tmp_path / size
        assert cli_main(["data", "synth", "--out", str(out), "--images-per-domain", "1", "--styles", "fog",
                         "--size", size]) == 0  # fmt: skip
    mixed = tmp_path / "mixed"
    (mixed / "fog" / "images").mkdir(parents=True)
    (mixed / "fog" / "labels").mkdir(parents=True)
    (mixed / "classes.txt").write_text((tmp_path / "8x8" / "classes.txt").read_text())
    for size, tag in (("8x8", "a"), ("16x12", "b")):
        for kind in ("images", "labels"):
            src = next((tmp_path / size / "fog" / kind).iterdir())
            (mixed / "fog" / kind / f"{tag}{src.suffix}").write_bytes(src.read_bytes())
    checkpoint = tmp_path / "m.safetensors"
    from common.data import dataset_classes
    from common.models.checkpoints import save_checkpoint

    save_checkpoint(build_model("tiny_unet", 9), checkpoint, "tiny_unet", dataset_classes("synthetic"))
    assert cli_main(["evaluate", str(checkpoint), "--data", f"folder:{mixed}?domain=fog"]) == 2
    err = capsys.readouterr().err
    assert "images of different sizes" in err and "a.png" in err and "b.png" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--out", "{tmp}/m.pt"], "end the name in .safetensors"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{a}"], "is one of the inputs"),
        (["--weights", "inf,1"], "finite and >= 0"),
        (["--weights", "0,0"], "not all 0"),
        (["--method", "ties"], "needs the shared starting model: --base"),
        (["--option", "k=2", "--method", "ties", "--base", "{a}"], "k (fraction of entries kept) must be in (0, 1]"),
    ],
)
def test_merge_refuses_bad_flags_with_one_line(tmp_path, capsys, args, message):

    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.safetensors")
        save_site_update(paths[-1], site_update(name, build_model("tiny_unet", 9).state_dict()), "tiny_unet", 9)
    filled = [a.format(tmp=tmp_path, a=paths[0]) for a in args]
    if "--out" not in filled:
        filled += ["--out", str(tmp_path / "m.safetensors")]
    before = {p: p.read_bytes() for p in paths}
    assert cli_main(["merge", *map(str, paths), *filled]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
