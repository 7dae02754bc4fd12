"""The command line: evaluate, simulate, and one clear error for bad input."""

from __future__ import annotations

import json

import pytest

from common.data import dataset_classes
from common.models.checkpoints import save_checkpoint
from common.models.factory import build_model
from fedmerge.cli import main as cli_main

FOG = "synthetic:?domain=fog&n=4&size=32x48&seed=5"
NIGHT = "synthetic:?domain=night&n=4&size=32x48&seed=5"


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model("tiny_unet", 9), path, "tiny_unet", dataset_classes("synthetic"))
    return path


def test_evaluate_writes_per_domain_miou_and_h(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(checkpoint), "--data", FOG, "--data", NIGHT, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][str(checkpoint)]
    fog, night = result["per_domain"]["fog"], result["per_domain"]["night"]
    assert result["harmonic_mean"] == pytest.approx(2 / (1 / fog + 1 / night))
    assert result["num_images"] == {"fog": 4, "night": 4}
    assert "| tiny.safetensors |" in capsys.readouterr().out


def test_evaluate_refuses_a_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    assert cli_main(["evaluate", str(bogus), "--data", FOG]) == 2
    err = capsys.readouterr().err
    assert "bogus.safetensors" in err and err.count("\n") == 1


def test_unknown_preset_is_one_clear_error(tmp_path, capsys):
    assert cli_main(["simulate", "--out-dir", str(tmp_path), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_bad_merge_option_is_one_clear_error(tmp_path, capsys):
    assert cli_main(["merge", "a", "b", "--out", str(tmp_path / "m.safetensors"), "--weights", "1,x"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_merge_of_plain_state_dicts_needs_the_model_named(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from common.models.checkpoints import load_checkpoint

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"site{seed}.pt"
        state = build_model("tiny_unet", 9).state_dict()
        for key in [k for k in state if k.endswith("num_batches_tracked")]:
            state[key] = torch.tensor(10)  # the BN counts of a file without explicit ones
        torch.save(state, path)
        paths.append(str(path))
    out = tmp_path / "merged.safetensors"
    assert cli_main(["merge", *paths, "--out", str(out)]) == 2
    assert "pass --arch and --num-classes" in capsys.readouterr().err and not out.exists()
    assert cli_main(["merge", *paths, "--out", str(out), "--arch", "tiny_unet", "--num-classes", "9",
                     "--bn-image-weight", "0"]) == 0  # fmt: skip
    model, meta = load_checkpoint(out)
    assert model.final_layer().out_channels == 9
    assert (meta["arch"], meta["merged_from"]) == ("tiny_unet", "site1,site2")
    mixed = tmp_path / "mixed.safetensors"
    assert cli_main(["merge", *paths, "--out", str(mixed), "--arch", "tiny_unet", "--num-classes", "9",
                     "--bn-image-weight", "0.25"]) == 0  # fmt: skip
    banked, meta = load_checkpoint(mixed)
    assert (banked.bank.names, banked.bank.image_weight, meta["fedmerge.bnbank.image-weight"]) == (("merged",), 0.25,
                                                                                                   "0.25")  # fmt: skip
    assert all(torch.equal(banked.model.state_dict()[k], v) for k, v in model.state_dict().items())
    # the weight travels in the metadata: the file holds the plain model's tensors alone, bit for bit
    plain, weighted = load_file(str(out)), load_file(str(mixed))
    assert weighted.keys() == plain.keys() and all(torch.equal(weighted[k], plain[k]) for k in plain)
    build_model("tiny_unet", 9).load_state_dict(weighted, strict=True)
    trainable, _ = load_checkpoint(mixed, with_bank=False)  # the model beneath, to adapt further
    assert type(trainable) is type(model) and trainable.train().training
    assert cli_main(["merge", *paths, "--out", str(mixed), "--arch", "tiny_unet", "--num-classes", "9",
                     "--bn-image-weight", "2"]) == 2  # fmt: skip
    assert "bn-image-weight must be in [0, 1]" in capsys.readouterr().err


def test_every_command_reads_every_model_file(checkpoint, tmp_path, capsys):
    """A site update holds a whole model: evaluate reads it; merge reads checkpoints as well as updates."""
    import torch

    from common.models.checkpoints import load_checkpoint
    from common.updates.files import save_site_update
    from common.updates.site import split_state
    from tests.fakes import site_update

    torch.manual_seed(4)
    update_file = tmp_path / "site.safetensors"
    update = site_update("fog", build_model("tiny_unet", 9).state_dict())
    save_site_update(update_file, update, "tiny_unet", 9)
    assert cli_main(["evaluate", str(update_file), str(checkpoint), "--data", FOG]) == 0
    assert "| site.safetensors |" in capsys.readouterr().out
    trained = build_model("tiny_unet", 9)
    for module in trained.modules():  # a trained model's BN layers have counted their batches
        if hasattr(module, "num_batches_tracked"):
            module.num_batches_tracked.fill_(10)
    model_file = save_checkpoint(trained, tmp_path / "model.safetensors", "tiny_unet", dataset_classes("synthetic"))
    out = tmp_path / "merged.safetensors"
    assert cli_main(["merge", str(update_file), str(model_file), "--out", str(out)]) == 0
    merged = load_checkpoint(out, with_bank=False)[0].state_dict()
    params, _ = split_state(trained.state_dict())
    for key, value in params.items():  # both files read whole: the parameters are the plain average
        torch.testing.assert_close(merged[key], (update.params[key] + value) / 2)
    assert cli_main(["evaluate", str(out), "--data", FOG]) == 0
