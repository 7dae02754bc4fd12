"""The field's networks (SegFormer, DAFormer, DeepLabV2) through fedmerge, and published weights as their start."""

from __future__ import annotations

import copy
import functools
import json
import logging
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.adaptation.context import AdaptContext
from clients.adaptation.hrda import imagenet_model
from clients.site import SiteJob, adapt_site
from common.bn.stats import BNStatsConfig, bn_layers, collect_bn_sums, exact_bn_statistics
from common.data import DataSpec, build_dataset
from common.merge.engine import MergeEngine
from common.models.checkpoints import load_checkpoint, read_model_file
from common.models.factory import build_model
from common.models.multires import MultiResSegmenter
from common.models.segformer import MIN_SIDE, pack_levels
from common.models.segmenter import Segmenter
from common.updates.files import load_site_update, save_site_update
from common.updates.site import bn_layer_names
from fedmerge.cli import main as cli_main
from tests.fakes import perturbed, site_update, spec
from tests.published import mit_imagenet, resnet101_imagenet, uda_checkpoint

# Published parameter counts: SegFormer (Xie et al. 2021, 150 ADE20K classes), DAFormer (Hoyer et al. 2022,
# 19 classes); DeepLabV2 on ResNet-101 with 19 classes is commonly cited as 43.9M.
PAPER_PARAMS = {
    "segformer_b0": (150, 3.8), "segformer_b1": (150, 13.7), "segformer_b2": (150, 27.5),
    "segformer_b3": (150, 47.3), "segformer_b4": (150, 64.1), "segformer_b5": (150, 84.7),
    "daformer_b5": (19, 85.2), "deeplabv2_resnet101": (19, 43.9),
}  # fmt: skip
HEAD_BN = {"segformer_b0": 1, "segformer_b5": 1, "daformer_b5": 8}  # MiT: BN only in the head
SUBSET = ["segformer_b0", "daformer_b5", "deeplabv2_resnet101"]
HEAVY = {"daformer_b5", "deeplabv2_resnet101"}  # ~10 s each on a quiet machine: 80-94 M parameters end to end
NUM_CLASSES = 9  # the synthetic data's
FOG = "synthetic:?domain=fog&n=2&size=64x64&seed=3"


@functools.cache
def _prototype(arch: str) -> Segmenter:
    """One build per architecture for the whole module (MiT-B5 takes seconds to initialise); tests copy it."""
    torch.manual_seed(0)
    return build_model(arch, NUM_CLASSES).eval()


def _copy(arch: str, hrda: bool = False) -> Segmenter:
    base = copy.deepcopy(_prototype(arch))
    return MultiResSegmenter(base, NUM_CLASSES) if hrda else base


def _params_with(model: Segmenter, num_classes: int) -> int:
    """The model's parameter count had it been built for ``num_classes``: only the class-wise convs change."""
    class_convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES]
    per_class = sum(m.weight[0].numel() + (m.bias is not None) for m in class_convs)
    return sum(p.numel() for p in model.parameters()) + (num_classes - NUM_CLASSES) * per_class


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to reach the network (a weights download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model build tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("arch", list(PAPER_PARAMS))
def test_builds_offline_with_the_published_size_and_predicts_at_the_input_size(arch, no_network):
    num_classes, millions = PAPER_PARAMS[arch]
    model = _prototype(arch)
    assert _params_with(model, num_classes) / 1e6 == pytest.approx(millions, abs=0.06)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, NUM_CLASSES, 64, 96) and torch.isfinite(out).all()
    if arch.startswith(("segformer", "daformer")):
        assert not bn_layers(model.backbone), "MiT normalises with LayerNorm only"
        assert len(bn_layers(model)) == HEAD_BN.get(arch, 1)
    else:
        assert not bn_layers(model.classifier) and len(bn_layers(model.backbone)) == 104


def test_a_mit_model_names_its_smallest_image_instead_of_a_kernel_size():
    model = _prototype("segformer_b0")
    with torch.no_grad():
        assert model(torch.rand(1, 3, MIN_SIDE, MIN_SIDE)).shape[-2:] == (MIN_SIDE, MIN_SIDE)
        with pytest.raises(ValueError, match=rf"at least {MIN_SIDE} pixels a side, got \(28, 40\)"):
            model(torch.rand(1, 3, MIN_SIDE - 1, 40))


def test_segformer_head_on_packed_levels_is_the_librarys_head_on_the_levels():
    """Embedding after the upsampling (the packing) gives what smp's decoder gives embedding before it."""
    model = _prototype("segformer_b0")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        levels = model.backbone((x - model.pixel_mean) / model.pixel_std)
        head = model.classifier
        expected = head.conv_seg(head.decoder(levels))  # smp's own forward: embed, then upsample
        got = model.decode(model.features(x))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_daformer_head_embeds_every_level_then_fuses_in_level_order():
    """The reference order of DAFormer: embed each level at its own size, upsample, concatenate finest first."""
    model = _prototype("daformer_b5")
    head = model.classifier
    levels = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(model.level_channels)]
    with torch.no_grad():
        embedded = [F.linear(lv.permute(0, 2, 3, 1), layer.proj.weight, layer.proj.bias).permute(0, 3, 1, 2)
                    for lv, layer in zip(levels, head.embed_layers.values(), strict=True)]  # fmt: skip
        up = [F.interpolate(e, size=(16, 16), mode="bilinear", align_corners=False) for e in embedded]
        expected = head.conv_seg(head.fuse_layer(torch.cat(up, dim=1)))
        got = model.decode(pack_levels(levels))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    dilations = [m.depthwise_conv.conv.dilation[0] for m in head.fuse_layer.aspp_modules[1:]]
    assert dilations == [6, 12, 18] and head.fuse_layer.aspp_modules[0].conv.kernel_size == (1, 1)


def test_deeplabv2_sums_four_dilated_branches_at_output_stride_8():
    model = _prototype("deeplabv2_resnet101")
    with torch.no_grad():
        feats = model.features(torch.rand(1, 3, 64, 64))
        branches = [conv(feats) for conv in model.classifier.aspp]
        logits = model.decode(feats)
    assert feats.shape[-2:] == (8, 8)
    assert [conv.dilation[0] for conv in model.classifier.aspp] == [6, 12, 18, 24]
    torch.testing.assert_close(logits, sum(branches[1:], branches[0]))


@pytest.fixture(scope="module")
def source_set():
    return build_dataset(DataSpec(kind="synthetic", domain="source", num_images=2, size=(64, 64)))


@pytest.fixture(scope="module")
def target_set():
    return build_dataset(DataSpec.parse(FOG))


def _bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value each BN layer normalises in one eval pass over ``batches``, as [C, N]: the reference."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        return lambda module, inputs: seen.setdefault(name, []).append(inputs[0].detach().transpose(0, 1).flatten(1))

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in bn_layers(model).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model.eval()(batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(values, dim=1).double() for name, values in seen.items()}


@pytest.mark.parametrize("arch", SUBSET)
def test_exact_statistics_of_the_wrapped_model_are_those_of_its_bn_inputs(arch, target_set):
    model = _copy(arch, hrda=True)
    batches = [target_set[i][0][None] for i in range(len(target_set))]
    inputs = _bn_inputs(model, batches)  # per image: the context view, then every detail window in one batch
    counts = exact_bn_statistics(model, batches, BNStatsConfig(mode="eval"))
    assert set(counts) == set(inputs) == set(bn_layers(model)) and counts
    for name, layer in bn_layers(model).items():
        x = inputs[name]
        assert int(counts[name][0]) == x.shape[1]
        torch.testing.assert_close(layer.running_mean.double(), x.mean(1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.running_var.double(), x.var(1, unbiased=False), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.slow] if a in HEAVY else []) for a in SUBSET])
def test_an_hrda_site_round_trips_merges_and_evaluates(arch, source_set, target_set, tmp_path, capsys):
    wrapped = f"hrda_{arch}"
    model = _copy(arch, hrda=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"steps": 1, "warmup": 0, "batch_size": 1, "rcs": False, "augment": False}
    job = SiteJob("fog", "hrda", options, batch_size=2, context=AdaptContext(source=source_set, progress=False))
    update = adapt_site(model, target_set, job)
    for part in ("base.backbone.", "base.classifier.", "attention."):  # one optimiser step reached every part
        assert any(not torch.equal(v, start[k]) for k, v in update.params.items() if k.startswith(part)), part
    layer = bn_layer_names(update.buffers)[0]
    assert int(update.counts[layer].min()) > 0 and update.num_examples == len(target_set)

    site_a = save_site_update(tmp_path / "fog.safetensors", update, wrapped, NUM_CLASSES)
    loaded, meta = load_site_update(site_a)
    assert meta["arch"] == wrapped and loaded.site == "fog"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in update.state_dict().items())
    assert all(torch.equal(loaded.counts[k], v) for k, v in update.counts.items())

    other = site_update("night", start, counts={k: 3 * v for k, v in update.counts.items()})  # the unadapted model
    site_b = save_site_update(tmp_path / "night.safetensors", other, wrapped, NUM_CLASSES)
    merged = tmp_path / "merged.safetensors"
    assert cli_main(["merge", str(site_a), str(site_b), "--out", str(merged), "--max-site-share", "1"]) == 0
    state = read_model_file(merged).state
    key = next(k for k in update.params if k.startswith("base.backbone.") and update.params[k].is_floating_point())
    torch.testing.assert_close(state[key], (update.params[key] + other.params[key]) / 2)
    mean = f"{layer}.running_mean"
    torch.testing.assert_close(state[mean], (update.buffers[mean] + 3 * other.buffers[mean]) / 4)

    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(merged), "--data", FOG, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][str(merged)]
    assert result["num_images"] == {"fog": 2} and 0.0 <= result["per_domain"]["fog"] <= 1.0


class _LayerNormOnly(Segmenter):
    """A model whose only normalisation is LayerNorm-like (GroupNorm with one group): no BN at all."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(1, 4))
        self.classifier = nn.Conv2d(4, 3, 1)

    @property
    def feature_channels(self) -> int:
        return 4

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)


def test_a_model_without_bn_is_told_plainly(caplog):
    from common.bn.bank import BNBank
    from common.models.banked import BankedSegmenter

    model = _LayerNormOnly()
    with caplog.at_level(logging.INFO, logger="common.bn.stats"):
        assert collect_bn_sums(model, [torch.rand(1, 3, 8, 8)]) == {}
    assert "no BN layers" in caplog.text
    engine = MergeEngine(spec(), model.state_dict())
    for seed in (1, 2):
        engine.ingest(site_update(f"s{seed}", perturbed(model.state_dict(), seed)))
    merged = engine.result()  # parameters average; there are no statistics to pool
    expected = (
        perturbed(model.state_dict(), 1)["classifier.weight"] + perturbed(model.state_dict(), 2)["classifier.weight"]
    ) / 2
    torch.testing.assert_close(merged["classifier.weight"], expected)
    with pytest.raises(ValueError, match="no BN layers"):
        engine.bank("own")
    with pytest.raises(ValueError, match="no BN layers"):
        BankedSegmenter(model, BNBank(("a",), {}, {}))


def test_a_bn_bank_chooses_by_the_one_bn_layer_of_a_segformer():
    """MiT's only BN layer is in the head: the bank keys on it and swaps its statistics image by image."""
    from common.bn.bank import BNBank
    from common.models.banked import BankedSegmenter

    model = _copy("segformer_b0")
    ((layer, bn),) = bn_layers(model).items()
    x = torch.rand(1, 3, 64, 64)
    neutral = BNBank(("probe",), {layer: torch.zeros(1, bn.num_features)}, {layer: torch.ones(1, bn.num_features)})
    mean, var = BankedSegmenter(model, neutral).image_statistics(x)
    means, variances = torch.stack([mean[0] + 5, mean[0]]).float(), torch.stack([var[0], var[0]]).float()
    banked = BankedSegmenter(model, BNBank(("far", "own"), {layer: means}, {layer: variances})).eval()
    assert banked.choose(x).tolist() == [1]
    with torch.no_grad():
        bn.running_mean.copy_(means[1])
        bn.running_var.copy_(variances[1])
        expected = model.eval()(x)  # under the entry it should pick
        bn.running_mean.copy_(means[0])  # the model itself now holds the other entry
        torch.testing.assert_close(banked(x), expected)
    assert torch.equal(bn.running_mean, means[0])  # and gets it back afterwards


def test_recalibrating_a_model_without_bn_is_skipped_with_the_reason(caplog):
    from flwr.app import ArrayRecord

    from server.strategy import OneShotMerge
    from tests.fakes import FakeGrid, fake_message, merge_config, reply_of

    template = _LayerNormOnly().state_dict()
    updates = {n: reply_of(site_update(f"s{n}", perturbed(template, n)), n) for n in (1, 2)}
    strategy = OneShotMerge(merge_config(recalibrate=True), template, make_message=fake_message)
    grid = FakeGrid(updates)
    with caplog.at_level(logging.INFO, logger="server"):
        result = strategy.start(grid, ArrayRecord(template))
    assert len(grid.pushed) == 2, "no second round was sent"
    assert strategy.report.recalibration == {"applied": False, "sites": [], "reason": "the model has no BN layers"}
    assert "recalibration skipped" in caplog.text and "classifier.weight" in result.arrays


# ----- published weights as the start ------------------------------------------------------------
def test_an_imagenet_mit_file_becomes_a_segformer_start(tmp_path, capsys):
    source = tmp_path / "mit_b0.pth"
    published = mit_imagenet("b0")
    torch.save(published, source)
    out = tmp_path / "start.safetensors"
    assert cli_main(["import-weights", "mit", str(source), "--arch", "segformer_b0", "--num-classes", "5",
                     "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{len(published) - 2} tensors mapped" in printed and "dropped 2 (the ImageNet classifier)" in printed
    assert "16 model tensors start fresh" in printed  # the SegFormer head: 4 embeddings, fuse conv + BN, classifier
    model, meta = load_checkpoint(out)
    assert meta["arch"] == "segformer_b0" and meta["import-layout"] == "mit"
    state = model.state_dict()
    for key in (
        "patch_embed1.proj.weight",
        "block1.0.attn.kv.weight",
        "block4.1.mlp.dwconv.dwconv.weight",
        "norm4.bias",
    ):
        assert torch.equal(state[f"backbone.{key}"], published[key]), key
    # the same file is a --backbone-weights file: the ImageNet reference of the feature distance loads it
    reference = build_model("segformer_b0", 5, backbone_weights=out)
    assert torch.equal(reference.state_dict()["backbone.block2.1.attn.q.weight"], published["block2.1.attn.q.weight"])
    wrapped = tmp_path / "hrda_start.safetensors"
    assert cli_main(["import-weights", "mit", str(source), "--arch", "hrda_segformer_b0", "--classes", "a,b,c",
                     "--out", str(wrapped)]) == 0  # fmt: skip
    assert "20 model tensors start fresh" in capsys.readouterr().out  # the attention head's 4 besides the head's 16
    for start in (out, wrapped):  # what an hrda site with backbone-weights builds, from either file
        frozen = imagenet_model(_copy("segformer_b0", hrda=True), str(start))
        sr = frozen.base.backbone.state_dict()["block3.0.attn.sr.weight"]
        assert torch.equal(sr, published["block3.0.attn.sr.weight"]), start


def test_an_imagenet_resnet_without_batch_counters_becomes_a_deeplabv2_start(tmp_path):
    source = tmp_path / "resnet101.pth"
    published = resnet101_imagenet(counters=False)
    torch.save(published, source)
    from common.models.weight_import import import_weights

    model, report = import_weights(source, "resnet", "deeplabv2_resnet101", 5)
    assert torch.equal(model.state_dict()["backbone.layer3.22.conv3.weight"], published["layer3.22.conv3.weight"])
    assert report.dropped == {"the ImageNet classifier": ["fc.weight", "fc.bias"]}
    assert all(k.endswith("num_batches_tracked") or k.startswith("classifier.") for k in report.fresh)


@pytest.fixture(scope="module")
def hrda_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "hrda_gta2cs.pth"
    checkpoint = uda_checkpoint(num_classes=NUM_CLASSES, hrda=True)
    torch.save(checkpoint, path)
    return path, checkpoint["state_dict"]


def test_an_hrda_checkpoint_loads_strictly_into_daformer_b5_from_its_ema_teacher(hrda_file, tmp_path, capsys):
    path, published = hrda_file
    out = tmp_path / "daformer.safetensors"
    assert cli_main(["import-weights", "daformer", str(path), "--arch", "daformer_b5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "HRDA's scale attention" in printed and "the student" in printed and "feature distance" in printed
    state = read_model_file(out).state
    _copy("daformer_b5").load_state_dict(state)  # strict: the file filled every tensor of the model
    copied = ("backbone.block3.39.attn.sr.weight", "classifier.fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var",
              "classifier.embed_layers.3.proj.weight", "classifier.conv_seg.weight")  # fmt: skip
    for key in copied:
        source = "ema_model." + key.replace("classifier.", "decode_head.head.")
        assert torch.equal(state[key], published[source]), key
    assert not torch.equal(state["classifier.conv_seg.weight"], published["model.decode_head.head.conv_seg.weight"])


def test_an_incomplete_checkpoint_is_refused_naming_every_missing_key(hrda_file, tmp_path, capsys):
    _, published = hrda_file
    gone = ["ema_model.decode_head.head.fuse_layer.bottleneck.bn.running_mean", "ema_model.backbone.norm3.weight"]
    broken = tmp_path / "broken.pth"
    stray = {"decode_head.conv_seg.weight": torch.zeros(1)}  # a key of no branch: named, never dropped quietly
    torch.save({"state_dict": {**{k: v for k, v in published.items() if k not in gone}, **stray}}, broken)
    out = tmp_path / "x.safetensors"
    assert cli_main(["import-weights", "daformer", str(broken), "--arch", "daformer_b5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 missing" in err and "classifier.fuse_layer.bottleneck.bn.running_mean" in err
    assert "backbone.norm3.weight" in err and "decode_head.conv_seg.weight (in the file)" in err
    assert not out.exists()
