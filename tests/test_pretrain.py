"""Source pretraining, its augmentation, checkpoints, and the pretrain/data commands."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.data import DataSpec, build_dataset, dataset_classes, make_loader
from common.data.synthetic import render
from common.data.transforms import TrainAugment
from common.models.checkpoints import load_checkpoint, read_model_file, save_checkpoint
from common.models.factory import build_model
from common.scoring.evaluation import evaluate_domain
from common.training.pretrain import PretrainConfig, pretrain, train_segmenter
from fedmerge.cli import main

SPEC = DataSpec.parse("synthetic?domain=source&n=8&size=32x48")
FAST = PretrainConfig(arch="tiny_unet", steps=6, batch_size=4, warmup_steps=2, progress=False)


def test_augmentation_moves_image_and_label_together_and_pads_with_ignore() -> None:
    # Image value encodes the label, so any misalignment after the transform shows up.
    label = torch.randint(0, 9, (3, 4)).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 8x8 blocks
    image = (label.float() / 10).expand(3, -1, -1).clone()
    torch.manual_seed(0)
    augment = TrainAugment(scale=(0.5, 1.5), flip=True, crop=(24, 32))
    saw_padding = False
    for _ in range(20):
        img, lab = augment(image, label)
        assert img.shape == (3, 24, 32) and lab.shape == (24, 32) and lab.dtype == torch.int64
        padded = lab == 255
        saw_padding |= bool(padded.any())
        assert torch.all(img[0][padded] == 0)
        agree = (img[0] * 10).round().long()[~padded] == lab[~padded]
        assert agree.float().mean() > 0.6  # block interiors agree (misaligned: ~1/9); edges blend
    assert saw_padding


def test_pretraining_learns_the_synthetic_source() -> None:
    dataset = build_dataset(SPEC.with_(num_images=16))
    torch.manual_seed(0)
    model = build_model("tiny_unet", 9)
    before = evaluate_domain(model, make_loader(dataset, 8), 9).miou
    config = replace(FAST, steps=60, batch_size=8, lr=1e-2, warmup_steps=5)
    result = train_segmenter(model, dataset, config)
    after = evaluate_domain(model, make_loader(dataset, 8), 9).miou
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert after > before + 0.15 and not model.training


def test_pretraining_is_deterministic_with_the_seed() -> None:
    a = pretrain(SPEC, FAST).state_dict()
    b = pretrain(SPEC, FAST).state_dict()
    c = pretrain(SPEC, replace(FAST, seed=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_round_trip_keeps_outputs_and_metadata(tmp_path) -> None:
    model = pretrain(SPEC, FAST)
    path = save_checkpoint(model, tmp_path / "m.safetensors", "tiny_unet", dataset_classes("synthetic"))
    loaded, meta = load_checkpoint(path, classes=dataset_classes("synthetic"))
    assert meta["fedmerge.format"] == "checkpoint/1" and meta["arch"] == "tiny_unet" and meta["num_classes"] == "9"
    assert meta["classes"].split(",")[:3] == ["sky", "building", "road"]
    x = build_dataset(SPEC)[0][0][None]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_mismatched_checkpoints_fail_with_one_clear_error(tmp_path) -> None:
    model = build_model("tiny_unet", 9)
    path = save_checkpoint(model, tmp_path / "m.safetensors", "tiny_unet", dataset_classes("synthetic"))
    with pytest.raises(
        ValueError, match=r"m.safetensors: checkpoint predicts \[sky, .*\], the data has \[sky, building, pole"
    ):
        load_checkpoint(path, classes=dataset_classes("camvid"))
    bad = tmp_path / "bad.safetensors"
    meta = {**read_model_file(path).meta, "num_classes": "11", "classes": ""}
    save_file(load_file(str(path)), str(bad), metadata=meta)
    with pytest.raises(
        ValueError, match=r"bad.safetensors: model tensor 'classifier.*' has shape \(9.*the model expects \(11"
    ):
        load_checkpoint(bad)
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors: the file does not say which model"):
        load_checkpoint(plain)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="12 class names for a model with 9 outputs"):
        save_checkpoint(model, tmp_path / "x.safetensors", "tiny_unet", ["c"] * 12)


def test_pretrain_command_writes_a_loadable_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "ckpt.safetensors"
    argv = ["pretrain", "--data", str(SPEC), "--arch", "tiny_unet", "--steps", "3", "--batch-size", "4", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta["data"] == str(SPEC) and meta["steps"] == "3" and model.final_layer().out_channels == 9
    assert main([*argv, "--out", str(tmp_path / "ckpt.pt")]) == 2
    assert main(["pretrain", "--data", "camvid:/nonexistent", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out must end in .safetensors" in err and "/nonexistent: dataset root for 'camvid' does not exist" in err
    recipe = ["--photometric", "--class-weight-power", "0.5", "--no-flip"]
    assert main([*argv, *recipe, "--out", str(out)]) == 0
    _, meta = load_checkpoint(out)
    assert meta["class_weight_power"] == "0.5" and meta["flip"] == "False" and "photometric" in meta["pretrain_key"]
    assert main([*argv, "--hard-pixel-fraction", "0", "--out", str(out)]) == 2
    assert "hard_pixel_fraction must be in (0, 1]" in capsys.readouterr().err


def test_data_synth_command_writes_the_folder_layout_the_folder_reader_reads(tmp_path, capsys) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--images-per-domain", "2", "--size", "32x48", "--seed", "4"]) == 0
    assert (out / "classes.txt").read_text().split() == dataset_classes("synthetic")
    assert "folder:" in (out / "README.txt").read_text()
    assert dataset_classes("folder", out) == dataset_classes("synthetic")
    ds = build_dataset(DataSpec("folder", str(out), domain="night"))
    image, label = ds[1]
    want_image, want_label = render("night", 1, seed=4, size=(32, 48))
    assert torch.equal(label, torch.from_numpy(want_label).long())
    assert torch.equal((image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(want_image))
    assert main(["data", "check", "--data", f"folder:{out}?domain=fog"]) == 0
    assert "2 images, all readable" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--styles", "smog"]) == 2
