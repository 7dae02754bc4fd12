"""Local adaptation methods and their shared pieces, on a tiny U-Net and tiny images."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clients.adaptation import METHODS, AdaptContext, losses
from clients.adaptation.ema import EMATeacher, ema_alpha
from clients.adaptation.loop import TrainState, run_training
from clients.adaptation.mixing import StrongAugment, class_mix, class_mix_mask
from clients.adaptation.optim import Schedule, build_optimizer
from clients.adaptation.sampling import RareClassSampler
from common.data import IGNORE, DataSpec, build_dataset
from common.models.factory import build_model
from common.models.multires import Box, MultiResSegmenter, fuse_scales, sliding_windows

SIZE = (32, 48)
NUM_CLASSES = 9


@pytest.fixture(scope="module")
def source_set(tiny_source):
    return tiny_source


@pytest.fixture(scope="module")
def target_set():
    return build_dataset(DataSpec(kind="synthetic", domain="fog", num_images=4, size=SIZE))


@pytest.fixture(scope="module")
def source_state(tiny_pretrained_state):
    return tiny_pretrained_state


def _model(state: dict, arch: str = "tiny_unet") -> torch.nn.Module:
    model = build_model(arch, NUM_CLASSES)
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- shared pieces


def test_ema_alpha_follows_the_schedule_and_cap():
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(3, 0.999) == pytest.approx(0.75)
    assert ema_alpha(10**6, 0.999) == pytest.approx(0.999)


def test_ema_update_averages_parameters_and_leaves_buffers():
    torch.manual_seed(0)
    student = build_model("tiny_unet", 3)
    teacher = EMATeacher(student, max_alpha=0.999)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        for name, buf in student.named_buffers():
            if "running_mean" in name:
                buf.add_(5.0)
    alpha = teacher.update(student, step=3)
    assert alpha == pytest.approx(0.75)
    s_params = dict(student.named_parameters())
    for name, p in teacher.model.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * s_params[name])
    for name, buf in teacher.model.state_dict().items():
        if "running_mean" in name:
            torch.testing.assert_close(buf, before[name])  # BN statistics are the teacher's own
    teacher.update(student, step=0)  # alpha_0 = 0: the teacher becomes the student
    for name, p in teacher.model.named_parameters():
        torch.testing.assert_close(p, s_params[name])


def test_pseudo_label_weight_is_the_confident_fraction_per_image():
    # Image 0: top probabilities 0.99, 0.968 (counts: ≥), 0.6 (class 1), 0.9 -> 2 of 4. Image 1: all 0.98 -> 1.
    top = torch.tensor([[0.99, 0.968], [0.4, 0.9]])
    probs0 = torch.stack([top, 1 - top])
    probs1 = torch.stack([torch.full((2, 2), 0.02), torch.full((2, 2), 0.98)])
    labels, weights = losses.pseudo_labels(torch.stack([probs0, probs1]), threshold=0.968)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0]))
    assert labels[0].tolist() == [[0, 0], [1, 0]]
    assert labels[1].eq(1).all()


def test_weighted_cross_entropy_counts_ignored_pixels_as_zero():
    logits = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, IGNORE]]])
    loss = losses.weighted_cross_entropy(logits, labels, torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.5 * math.log(2) / 2)


def test_class_mix_label_is_source_under_the_mask_and_pseudo_label_elsewhere():
    gen = torch.Generator().manual_seed(3)
    src_label = torch.tensor([[0, 0, 1, 1], [2, 2, 3, IGNORE]]).unsqueeze(0)
    src_image = torch.ones(1, 3, 2, 4)
    tgt_image = torch.zeros(1, 3, 2, 4)
    pseudo = torch.full((1, 2, 4), 7)
    mixed = class_mix(src_image, src_label, tgt_image, pseudo, torch.tensor([0.3]), gen)
    mask = mixed.masks[0]
    chosen = set(src_label[0][mask].tolist())
    assert len(chosen) == 2  # half of the 4 present classes, ignore excluded
    assert mask.eq(torch.isin(src_label[0], torch.tensor(sorted(chosen)))).all()  # whole classes only
    assert mixed.labels[0][mask].eq(src_label[0][mask]).all()
    assert mixed.labels[0][~mask].eq(7).all()
    assert mixed.images[0][:, mask].eq(1).all() and mixed.images[0][:, ~mask].eq(0).all()
    assert mixed.weights[0][mask].eq(1).all()
    torch.testing.assert_close(mixed.weights[0][~mask], torch.full(((~mask).sum(),), 0.3))


def test_class_mix_mask_of_an_all_ignore_label_is_empty():
    assert not class_mix_mask(torch.full((3, 3), IGNORE), torch.Generator()).any()


def test_strong_augment_keeps_range_and_shape_and_repeats_with_the_seed():
    images = torch.rand(2, 3, 20, 30)
    aug = StrongAugment(jitter_prob=1.0, blur_prob=1.0)
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, images)


def test_focal_entropy_value_on_a_known_input():
    # Two pixels over C=2 classes: uniform (H=1) and certain (H=0): (1-H)^gamma·H is 0 for both;
    # a pixel at p=(0.9, 0.1) has H = h(0.9)/log 2 and contributes (1-H)^5·H.
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    probs = torch.tensor([[0.5, 1.0, 0.9], [0.5, 0.0, 0.1]]).view(1, 2, 1, 3)
    assert losses.normalized_entropy(probs)[0, 0].tolist() == pytest.approx([1.0, 0.0, h], abs=1e-6)
    assert losses.focal_entropy(probs, gamma=5.0).item() == pytest.approx((1 - h) ** 5 * h / 3, rel=1e-5)


def test_weighted_diversity_is_high_for_spread_and_low_for_collapsed_predictions():
    spread = torch.eye(4).view(1, 4, 2, 2)  # four certain pixels, one per class
    collapsed = torch.zeros(1, 4, 2, 2)
    collapsed[:, 0] = 1
    assert losses.weighted_diversity(spread).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.weighted_diversity(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_negative_label_loss_value_on_a_known_input():
    # Reference (teacher) 0.9/0.08/0.02: only class 2 is below 0.04; student puts 0.3 on it.
    reference = torch.tensor([0.9, 0.08, 0.02]).view(1, 3, 1, 1)
    student = torch.tensor([0.5, 0.2, 0.3]).view(1, 3, 1, 1)
    assert losses.negative_label_loss(student, reference, 0.04).item() == pytest.approx(-math.log(0.7), rel=1e-6)
    assert losses.negative_label_loss(student, reference, 0.01).item() == pytest.approx(0.0, abs=1e-7)


def _blocks(rare: int, pixels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four 16x16 images, half class 0 and half class 1; image ``rare`` also shows ``pixels`` of class 2."""
    items = []
    for i in range(4):
        label = torch.zeros(16, 16, dtype=torch.long)
        label[:8] = 1
        if i == rare:
            label.view(-1)[-pixels:] = 2
        items.append((torch.zeros(3, 16, 16), label))
    return items


def test_rare_class_sampling_draws_the_image_that_shows_the_rare_class():
    """Class 2 covers 2% of the pixels, all in image 3: at T = 0.01 nearly every draw is image 3, and at
    a high temperature the classes are drawn about evenly; an image with too few pixels of a class is
    never drawn for it (3000 px at 512x512 scales to 3 px at 16x16)."""
    draws = torch.Generator().manual_seed(0)
    sharp = RareClassSampler(_blocks(rare=3, pixels=20), 3, temperature=0.01).sample(400, draws)
    assert sharp.count(3) > 0.95 * len(sharp)
    flat = RareClassSampler(_blocks(rare=3, pixels=20), 3, temperature=100.0).sample(600, draws)
    assert 0.4 < flat.count(3) / len(flat) < 0.6  # class 2 (image 3 only) a third, plus a quarter of the rest
    too_few = RareClassSampler(_blocks(rare=3, pixels=2), 3, temperature=0.01)
    assert len(too_few.candidates[2]) == 0 and too_few.class_probs[2] == 0
    assert too_few.sample(200, draws).count(3) < 0.5 * 200  # classes 0 and 1 are in every image


def test_optimizer_gives_the_head_ten_times_the_rate_and_skips_frozen_parameters():
    model = build_model("tiny_unet", 3)
    model.final_layer().requires_grad_(False)
    opt = build_optimizer(model, lr=1e-4, head_lr_mult=10.0)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert id(model.final_layer().weight) not in rates
    head = [p for p in model.head_parameters() if p.requires_grad]
    assert all(rates[id(p)] == pytest.approx(1e-3) for p in head)
    assert all(rates[id(p)] == pytest.approx(1e-4) for p in model.backbone_parameters())


def test_schedule_warms_up_then_decays_to_zero():
    s = Schedule(steps=100, warmup=10)
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(50) == pytest.approx(0.5) and s.factor(100) == 0.0


# ---------------------------------------------------------------- resume


def _toy_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = build_model("tiny_unet", 3)
    return TrainState(model, build_optimizer(model, lr=1e-3), EMATeacher(model))


def _toy_step(state: TrainState, calls: list[int], crash_at: int | None = None):
    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        if t == crash_at:
            raise RuntimeError("simulated crash")
        calls.append(t)
        x = torch.rand(2, 3, 16, 16, generator=gen)
        loss = state.model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.teacher.update(state.model, t)
        return {"loss": loss.item()}

    return step


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(tmp_path):
    schedule = Schedule(steps=6, warmup=2)
    ref = _toy_state()
    run_training(ref, _toy_step(ref, []), schedule, AdaptContext(progress=False), name="toy", config="c", num_target=1)

    ctx = AdaptContext(progress=False, checkpoint_dir=str(tmp_path))
    crashed = _toy_state()
    calls: list[int] = []
    with pytest.raises(RuntimeError):
        run_training(crashed, _toy_step(crashed, calls, crash_at=4), schedule, ctx,
                     name="toy", config="c", num_target=1, checkpoint_every=3)  # fmt: skip
    assert calls == [0, 1, 2, 3]

    resumed = _toy_state()  # a fresh process: the same starting weights, nothing else
    calls = []
    run_training(resumed, _toy_step(resumed, calls), schedule, ctx, name="toy", config="c", num_target=1,
                 checkpoint_every=3)  # fmt: skip
    assert calls == [3, 4, 5]  # the checkpoint was taken after step 2
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(ref.teacher.model.parameters(), resumed.teacher.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_different_config_does_not_resume(tmp_path):
    ctx = AdaptContext(progress=False, checkpoint_dir=str(tmp_path))
    state = _toy_state()
    run_training(state, _toy_step(state, []), Schedule(steps=2), ctx, name="toy", config="a", num_target=1)
    other = _toy_state()
    calls: list[int] = []
    run_training(other, _toy_step(other, calls), Schedule(steps=2), ctx, name="toy", config="b", num_target=1)
    assert calls == [0, 1]


# ---------------------------------------------------------------- methods


def _adapt(name: str, state: dict, target, options: dict, source=None, arch: str = "tiny_unet", seed: int = 0):
    model = _model(state, arch)
    method = METHODS.get(name)
    context = AdaptContext(source=source, progress=False, seed=seed)
    method.load()(model, target, context, method.make_options(options))
    return model, context.metrics


def test_tent_lowers_entropy_and_changes_only_bn_affine_parameters(source_state, target_set):
    model, metrics = _adapt("tent", source_state, target_set, {"steps": 12, "batch_size": 4, "lr": 1e-2})
    assert metrics["train-loss"] < metrics["train-loss-start"]
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and value.dim() == 4:  # convolutions stay at the source weights
            torch.testing.assert_close(value, source_state[name])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_selftrain_lowers_its_pseudo_label_cross_entropy(source_state, target_set, bn):
    """The weighted loss may rise as the weights (confidence) grow; the CE to the labels falls."""
    options = {"steps": 12, "batch_size": 4, "lr": 1e-3, "threshold": 0.6, "warmup": 0, "bn": bn}
    _, metrics = _adapt("selftrain", source_state, target_set, options)
    assert metrics["train-confident"] > 0
    assert metrics["train-ce"] < 0.8 * metrics["train-ce-start"]


SFDA_SEEDS = (0, 1, 2)


def _sfda_objective(model, fixed: list[torch.Tensor], draws: int = 8) -> float:
    """The trained sfda objective on the method's own easy/hard split with the start's probabilities,
    averaged over ``draws`` ClassMix masks and augmentations: one draw alone is too noisy to rank two
    models (on one draw, 12 steps raised it for some seeds and thread counts)."""
    from clients.adaptation.sfda import SFDAConfig, sfda_losses

    probe = copy.deepcopy(model).train()  # batch statistics, as trained; the model's own buffers stay
    config = SFDAConfig(threshold=0.6, augment=True)  # as trained below
    with torch.no_grad():
        terms = [sfda_losses(probe, *fixed, config, torch.Generator().manual_seed(g))["loss"] for g in range(draws)]
    return float(torch.stack(terms).mean())


def test_sfda_lowers_its_loss_and_keeps_the_classifier(source_state, target_set):
    """Over three seeds, 12 steps lower the objective by at least 5% on average (measured: 11% at one
    thread, 15% at two; every single seed lowered it too)."""
    from clients.adaptation.norm import refresh_bn
    from clients.adaptation.sfda import easy_split

    start = _model(source_state)
    refresh_bn(start, target_set)  # what the method does first, so the split below is the method's own
    easy = easy_split(start, target_set, 0.5)
    images = torch.stack([target_set[i][0] for i in range(len(target_set))])
    with torch.no_grad():
        probs = start.eval()(images).softmax(1)
    fixed = [images[easy], images[~easy], probs[easy], probs[~easy]]
    before = _sfda_objective(start, fixed)
    options = {"steps": 12, "lr": 1e-3, "threshold": 0.6, "warmup": 0, "easy_fraction": 0.5, "augment": True}
    after, train_start, train_end = [], [], []
    for seed in SFDA_SEEDS:
        model, metrics = _adapt("sfda", source_state, target_set, options, seed=seed)
        after.append(_sfda_objective(model, fixed))
        train_start.append(metrics["train-loss-start"])
        train_end.append(metrics["train-loss"])
        assert metrics["train-confident"] > 0
        final = model.final_layer()
        torch.testing.assert_close(final.weight, source_state["classifier.1.weight"])  # frozen
        assert final.weight.requires_grad  # and unfrozen again afterwards
    assert sum(after) / len(after) < 0.95 * before, (before, after)
    assert sum(train_end) < sum(train_start), (train_start, train_end)


def test_easy_split_ranks_by_entropy_and_keeps_one_of_each():
    from clients.adaptation.sfda import easy_split

    class Fixed(torch.nn.Module):
        def forward(self, x):  # sharpness grows with the image's brightness
            scale = x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1) * 20
            return torch.cat([scale * torch.ones_like(x[:, :1]), torch.zeros_like(x[:, :2])], 1)

    target = [(torch.full((3, 4, 4), v), torch.zeros(4, 4, dtype=torch.long)) for v in (0.1, 0.9, 0.5, 0.7)]
    assert easy_split(Fixed(), target, 0.5).tolist() == [False, True, False, True]
    assert easy_split(Fixed(), target, 0.01).sum() == 1
    assert easy_split(Fixed(), target, 0.99).sum() == 3


@pytest.mark.parametrize("arch", ["hrda_tiny_unet", "tiny_unet"])
def test_hrda_lowers_its_loss(source_state, source_set, target_set, arch):
    model = build_model(arch, NUM_CLASSES)
    (model.base if arch.startswith("hrda_") else model).load_state_dict(source_state)
    method = METHODS.get("hrda")
    context = AdaptContext(source=source_set, progress=False)
    options = {"steps": 12, "lr": 1e-3, "threshold": 0.6, "warmup": 0}
    method.load()(model, target_set, context, method.make_options(options))
    metrics = context.metrics
    assert metrics["multires"] == float(arch.startswith("hrda_"))
    assert metrics["train-loss"] < metrics["train-loss-start"]
    assert metrics["train-source"] < metrics["train-source-start"]


def test_hrda_refuses_to_run_without_source(source_state, target_set):
    with pytest.raises(ValueError, match="source"):
        _adapt("hrda", source_state, target_set, {"steps": 1})


def test_unknown_bn_mode_is_rejected():
    with pytest.raises(ValueError, match="bn mode"):
        METHODS.get("selftrain").make_options({"bn": "sometimes"})


# ---------------------------------------------------------------- multi-resolution wrapper


def test_fusion_reduces_to_context_at_zero_and_to_detail_inside_the_crop_at_one():
    torch.manual_seed(0)
    context, detail = torch.randn(2, 3, 8, 10), torch.randn(2, 3, 4, 5)
    box = Box(top=2, left=3, height=4, width=5)
    rows, cols = box.slices()
    fused0 = fuse_scales(context, detail, torch.zeros(2, 3, 8, 10), box)
    torch.testing.assert_close(fused0, context)
    fused1 = fuse_scales(context, detail, torch.ones(2, 3, 8, 10), box)
    torch.testing.assert_close(fused1[:, :, rows, cols], detail)
    outside = torch.ones(8, 10, dtype=torch.bool)
    outside[rows, cols] = False
    torch.testing.assert_close(fused1[:, :, outside], context[:, :, outside])
    half = fuse_scales(context, detail, torch.full((2, 3, 8, 10), 0.5), box)
    torch.testing.assert_close(half[:, :, rows, cols], 0.5 * (detail + context[:, :, rows, cols]))


def _saturate_attention(model: MultiResSegmenter, value: float) -> None:
    last = model.attention[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


def test_wrapper_forward_is_context_or_sliding_detail_at_the_attention_extremes():
    torch.manual_seed(0)
    model = build_model("hrda_tiny_unet", 4).eval()
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        _saturate_attention(model, -50.0)
        torch.testing.assert_close(model(x), model.context(x)[0])
        _saturate_attention(model, 50.0)
        torch.testing.assert_close(model(x), model.sliding_detail(x))
        box = Box(4, 8, 12, 20)
        fused, detail = model.train_forward(x, box)
        torch.testing.assert_close(fused[:, :, 4:16, 8:28], detail)
        torch.testing.assert_close(detail, model.base(x[:, :, 4:16, 8:28]))


def test_sliding_windows_tile_the_image_with_half_overlap():
    from common.models.multires import MultiResConfig

    boxes = sliding_windows(180, 240, MultiResConfig())
    assert {(b.top, b.left) for b in boxes} == {(t, c) for t in (0, 45, 90) for c in (0, 60, 120)}
    assert all((b.height, b.width) == (90, 120) for b in boxes)
    odd = sliding_windows(25, 31, MultiResConfig())
    covered = torch.zeros(25, 31)
    for b in odd:
        covered[b.slices()] = 1
    assert covered.all()


def test_plain_checkpoint_wraps_with_the_same_fresh_attention_head_everywhere(tmp_path):
    from common.models.checkpoints import load_checkpoint, save_checkpoint, wrap_checkpoint_for_hrda

    torch.manual_seed(1)
    plain = build_model("tiny_unet", 4)
    path = save_checkpoint(plain, tmp_path / "plain.safetensors", "tiny_unet", list("abcd"))
    a = build_model("hrda_tiny_unet", 4, weights=path)
    torch.manual_seed(2)  # the global seed must not matter
    b = build_model("hrda_tiny_unet", 4, weights=path)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=key)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(a.state_dict()[f"base.{key}"], value)
    wrapped = wrap_checkpoint_for_hrda(path, tmp_path / "wrapped.safetensors")
    c, meta = load_checkpoint(wrapped)
    assert meta["arch"] == "hrda_tiny_unet" and isinstance(c, MultiResSegmenter)
    for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vc)


# ---------------------------------------------------------------- command line


def test_cli_lists_every_method_with_its_defaults(capsys):
    from fedmerge.cli import main

    assert main(["adapt", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("adabn", "tent", "selftrain", "sfda", "hrda [needs --source]"):
        assert name in out
    assert "ema-max: float = 0.999" in out


def test_cli_adapts_a_wrapped_model_and_writes_a_site_update(tmp_path, source_state, capsys):
    from common.data import dataset_classes
    from common.models.checkpoints import save_checkpoint
    from common.updates.files import load_site_update
    from fedmerge.cli import main

    ckpt = save_checkpoint(
        _model(source_state), tmp_path / "src.safetensors", "tiny_unet", dataset_classes("synthetic")
    )
    out = tmp_path / "site.safetensors"
    code = main([
        "adapt", "--method", "hrda", "--model", str(ckpt), "--arch", "hrda_tiny_unet",
        "--data", "synthetic?domain=night&n=3&size=32x48", "--source", "synthetic?domain=source&n=4&size=32x48",
        "--set", "steps=2", "--set", "rcs=false", "--out", str(out), "--quiet",
        "--eval", "synthetic?domain=night&n=2&size=32x48&seed=9",
    ])  # fmt: skip
    assert code == 0
    update, meta = load_site_update(out)
    assert meta["arch"] == "hrda_tiny_unet" and meta["domain"] == "night"
    assert any(k.startswith("attention.") for k in update.params)
    assert "mIoU on synthetic" in capsys.readouterr().out
    assert main(["adapt", "--method", "hrda", "--model", str(ckpt), "--data", "synthetic?n=2", "--out", "x"]) == 2
