"""The source-recipe options: photometric jitter, class weights, hard-pixel loss, and the plan's key."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from common.data import DataSpec, build_dataset
from common.data.transforms import PhotometricAugment, TrainAugment
from common.models.factory import build_model
from common.training.pretrain import (
    PretrainConfig,
    PretrainPlan,
    _Augmented,
    class_weights,
    pretrain,
    pretrain_to_file,
    segmentation_loss,
)

SPEC = DataSpec.parse("synthetic?domain=source&n=8&size=32x48")
FAST = PretrainConfig(arch="tiny_unet", steps=4, batch_size=4, warmup_steps=2, progress=False)


def test_photometric_jitter_stays_in_range_and_can_be_switched_off() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    jitter = PhotometricAugment(p=1.0)
    outs = [jitter(image) for _ in range(20)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert all(not torch.equal(o, image) for o in outs)
    assert torch.equal(PhotometricAugment(p=0.0)(image), image)
    dark = PhotometricAugment((0.4, 0.5), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), p=1.0)(image)
    assert torch.allclose(dark / image, torch.full_like(image, dark.sum() / image.sum()), atol=1e-5)
    assert 0.4 <= float(dark.sum() / image.sum()) <= 0.5
    with pytest.raises(ValueError, match="gamma range"):
        PhotometricAugment(gamma=(1.5, 0.7))
    with pytest.raises(ValueError, match="probability"):
        PhotometricAugment(p=1.5)


def test_photometric_jitter_changes_the_image_and_never_the_label() -> None:
    base = build_dataset(SPEC)
    geometric = TrainAugment(scale=(0.75, 1.5), crop=(24, 32))
    torch.manual_seed(3)
    plain_image, plain_label = _Augmented(base, geometric)[0]
    torch.manual_seed(3)  # the photometric draws come after the geometric ones: same crop, same flip
    image, label = _Augmented(base, geometric, PhotometricAugment(p=1.0))[0]
    assert torch.equal(label, plain_label) and label.dtype == torch.int64
    assert image.shape == plain_image.shape and not torch.equal(image, plain_image)
    assert image.min() >= 0 and image.max() <= 1


def test_class_weights_follow_the_frequency_power_and_average_to_one() -> None:
    label = torch.zeros(10, 10, dtype=torch.int64)
    label[:, :1] = 1  # 10 % class 1, 90 % class 0, class 2 absent, one void row
    label[0] = 255
    dataset = [(torch.zeros(3, 10, 10), label)]
    assert torch.allclose(class_weights(dataset, 3, 0.0), torch.ones(3))  # type: ignore[arg-type]
    w = class_weights(dataset, 3, 0.5)  # type: ignore[arg-type]
    freq = torch.tensor([0.9, 0.1])
    assert torch.isclose(w[1] / w[0], torch.tensor(3.0))  # sqrt(0.9 / 0.1)
    assert torch.isclose((freq * w[:2]).sum(), torch.tensor(1.0))
    assert w[2] == w.max()
    with pytest.raises(ValueError, match="no labeled pixels"):
        class_weights([(torch.zeros(3, 2, 2), torch.full((2, 2), 255))], 3, 0.5)  # type: ignore[arg-type]


def test_the_default_loss_is_plain_cross_entropy_and_hard_pixels_raise_it() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    labels = torch.randint(0, 4, (2, 6, 6))
    labels[0, 0] = 255
    plain = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.equal(segmentation_loss(logits, labels), plain)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")[labels != 255]
    hard = segmentation_loss(logits, labels, hard_pixel_fraction=0.25)
    k = -(-per_pixel.numel() // 4)
    assert torch.isclose(hard, per_pixel.sort(descending=True).values[:k].mean()) and hard > plain
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert torch.isclose(
        segmentation_loss(logits, labels, weight), F.cross_entropy(logits, labels, weight=weight, ignore_index=255)
    )
    void = segmentation_loss(logits, torch.full_like(labels, 255), hard_pixel_fraction=0.5)
    void.backward()
    assert float(void.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))  # void pixels: no push


def test_config_rejects_options_out_of_range() -> None:
    for name, value in (("class_weight_power", -0.1), ("hard_pixel_fraction", 0.0), ("label_smoothing", 1.0)):
        with pytest.raises(ValueError, match=f"^{name} must be in .*, got {value}$"):
            replace(FAST, **{name: value})  # type: ignore[arg-type]


def test_training_with_every_option_is_repeatable_and_differs_from_plain() -> None:
    recipe = replace(
        FAST, photometric=PhotometricAugment(), class_weight_power=0.5, hard_pixel_fraction=0.5, label_smoothing=0.1
    )
    a, b, plain = (pretrain(SPEC, c).state_dict() for c in (recipe, recipe, FAST))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)


def test_plan_key_keeps_old_keys_and_names_every_option() -> None:
    plan = PretrainPlan(SPEC, arch="tiny_unet", steps=3, batch_size=4)
    assert plan.key() == f"{SPEC}|tiny_unet|3|4|0" and plan.options() == {}
    changes = {
        "lr": 1e-3,
        "scale": (0.5, 2.0),
        "crop": (16, 16),
        "photometric": True,
        "class_weight_power": 0.5,
        "hard_pixel_fraction": 0.25,
        "label_smoothing": 0.1,
    }
    keys = {replace(plan, **{name: value}).key() for name, value in changes.items()}  # type: ignore[arg-type]
    assert len(keys) == len(changes) and plan.key() not in keys
    assert "brightness=" in replace(plan, photometric=True).key()  # the jitter's ranges, spelled out
    from_toml = replace(plan, scale=[0.75, 1.5], crop=[16, 16])  # type: ignore[arg-type]
    assert from_toml.scale == (0.75, 1.5) and from_toml.key() == replace(plan, crop=(16, 16)).key()
    with pytest.raises(ValueError, match="hard_pixel_fraction"):
        replace(plan, hard_pixel_fraction=2.0)


def test_pretrain_to_file_records_the_options(tmp_path) -> None:
    plan = PretrainPlan(SPEC, arch="tiny_unet", steps=2, batch_size=4, class_weight_power=0.5, photometric=True)
    with safe_open(str(pretrain_to_file(plan, tmp_path / "m.safetensors", progress=False)), "pt") as f:
        meta = f.metadata()
    assert meta["pretrain_key"] == plan.key() and meta["class_weight_power"] == "0.5"
    assert meta["photometric"].startswith("PhotometricAugment(") and meta["steps"] == "2"
    assert "lr" not in meta  # options at their defaults are the defaults


def test_new_architectures_are_small_bn_models_and_small_unet_is_unchanged() -> None:
    assert sum(p.numel() for p in build_model("small_unet", 11).parameters()) == 490_507
    for arch in ("small_unet_d5", "small_unet_w12d5"):
        model = build_model(arch, 11)
        assert sum(p.numel() for p in model.parameters()) <= 3_000_000
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert model.eval()(torch.rand(1, 3, 36, 52)).shape == (1, 11, 36, 52)
