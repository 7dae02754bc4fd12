"""The BN bank: every site's statistics shipped with one model, each image picking the closest entry."""

from __future__ import annotations

import pytest
import torch

from common.bn.bank import BNBank, symmetric_kl
from common.bn.stats import apply_bn_sums, bn_layers, collect_bn_sums
from common.merge.engine import MergeEngine
from common.models.banked import BankedSegmenter, mixed_batch_norm
from common.models.checkpoints import load_checkpoint
from common.models.factory import build_model
from tests.fakes import site_update, spec


@pytest.fixture(scope="module")
def domains():
    torch.manual_seed(0)
    bright = torch.rand(6, 3, 32, 48) * 0.5 + 0.5
    dark = torch.rand(6, 3, 32, 48) * 0.2
    return {"bright": bright, "dark": dark}


def _adapted(model, images):
    """The model with exact statistics of ``images``: what an AdaBN site sends."""
    adapted = build_model("tiny_unet", 5)
    adapted.load_state_dict(model.state_dict())
    apply_bn_sums(adapted, collect_bn_sums(adapted, images.split(3)))
    return adapted.eval()


def test_symmetric_kl_is_zero_for_equal_gaussians_symmetric_and_positive():
    m, v = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert float(symmetric_kl(m, v, m, v)) == pytest.approx(0.0, abs=1e-9)
    a = symmetric_kl(m, v, m + 1, v * 3)
    # per channel (va + d²) / 2vb + (vb + d²) / 2va - 1 with d = 1: (2/6 + 4/2 - 1) + (3/12 + 7/4 - 1) = 4/3 + 1
    assert float(a) == pytest.approx(7 / 3, rel=1e-4)
    assert float(a) == pytest.approx(float(symmetric_kl(m + 1, v * 3, m, v)))


def test_each_image_gets_the_statistics_of_its_own_domain(domains):
    torch.manual_seed(1)
    model = build_model("tiny_unet", 5).eval()
    sites = {name: _adapted(model, images) for name, images in domains.items()}
    engine = MergeEngine(spec(), model.state_dict())
    for name, site in sites.items():
        counts = {layer: torch.full((m.num_features,), 6 * 32 * 48, dtype=torch.int64)
                  for layer, m in bn_layers(site).items()}  # fmt: skip
        engine.ingest(site_update(name, site.state_dict(), num_examples=6, counts=counts))
    bank = engine.bank("own")
    assert bank.names == ("bright", "dark")
    banked = BankedSegmenter(_adapted(model, domains["bright"]), bank).eval()
    mixed = torch.cat([domains["dark"][:2], domains["bright"][:2], domains["dark"][2:3]])
    assert banked.choose(mixed).tolist() == [1, 1, 0, 0, 1]
    out = banked(mixed)
    for i, name in enumerate(["dark", "dark", "bright", "bright", "dark"]):
        expected = sites[name](mixed[i : i + 1])  # the site's own model: same parameters, its statistics
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-4, atol=1e-5)
    first = next(iter(bn_layers(banked.model).values()))
    torch.testing.assert_close(first.running_mean, bn_layers(sites["bright"])[next(iter(bank.mean))].running_mean)


def test_a_bank_travels_in_the_merged_checkpoint(domains, tmp_path):
    torch.manual_seed(2)
    model = build_model("tiny_unet", 5).eval()
    engine = MergeEngine(spec(), model.state_dict())
    for name, images in domains.items():
        site = _adapted(model, images)
        counts = {layer: torch.full((m.num_features,), 6 * 32 * 48, dtype=torch.int64)
                  for layer, m in bn_layers(site).items()}  # fmt: skip
        engine.ingest(site_update(name, site.state_dict(), num_examples=6, counts=counts))
    path = engine.save(tmp_path / "merged.safetensors", "tiny_unet", 5, bank=engine.bank("own"))
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, BankedSegmenter) and loaded.bank.names == ("bright", "dark")
    assert meta["fedmerge.bnbank"] == "bright,dark"
    for layer, mean in engine.bank("own").mean.items():
        assert torch.equal(loaded.bank.mean[layer], mean)
    plain_path = engine.save(tmp_path / "plain.safetensors", "tiny_unet", 5)
    assert not isinstance(load_checkpoint(plain_path)[0], BankedSegmenter)


def test_a_bank_that_does_not_fit_the_model_is_refused():
    model = build_model("tiny_unet", 5)
    with pytest.raises(ValueError, match="disagree on the BN layers"):
        BankedSegmenter(model, BNBank(("a",), {"nope": torch.zeros(1, 3)}, {"nope": torch.ones(1, 3)}))
    with pytest.raises(ValueError, match="for 2 entries"):
        BNBank(("a", "b"), {"x": torch.zeros(1, 3)}, {"x": torch.ones(1, 3)})


def test_an_image_s_own_statistics_mix_into_its_entry_by_hand():
    """Channel values 1 and 3 (mean 2, variance 1), stored mean 0 and variance 4, w = 1/2: mean 1, variance 2.5."""
    layer = torch.nn.BatchNorm2d(1, eps=0.0).eval()
    layer.running_mean.fill_(0.0)
    layer.running_var.fill_(4.0)
    layer.weight.data.fill_(2.0)
    layer.bias.data.fill_(1.0)
    x = torch.tensor([[[[1.0, 3.0]]]])
    expected = (x - 1.0) / 2.5**0.5 * 2.0 + 1.0
    torch.testing.assert_close(mixed_batch_norm(layer, x, 0.5), expected)
    torch.testing.assert_close(mixed_batch_norm(layer, x, 0.0), layer(x))  # w = 0: the stored statistics alone


def test_the_image_weight_follows_each_image_alone_and_zero_changes_nothing(domains):
    torch.manual_seed(3)
    model = _adapted(build_model("tiny_unet", 5).eval(), domains["bright"])
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    images = torch.cat([domains["bright"][:2], domains["dark"][:2]])
    plain = BankedSegmenter(model, BNBank.single("merged", buffers, 0.0)).eval()
    assert torch.equal(plain(images), model(images))
    mixed = BankedSegmenter(model, BNBank.single("merged", buffers, 0.3)).eval()
    together = mixed(images)
    assert not torch.allclose(together, model(images), atol=1e-3)
    for i in range(images.shape[0]):  # an image's normalisation does not depend on the batch it came in
        torch.testing.assert_close(together[i : i + 1], mixed(images[i : i + 1]), rtol=1e-4, atol=1e-5)
    assert torch.equal(model(images), plain(images))  # the hooks are gone and the statistics restored


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_an_image_weight_outside_zero_to_one_is_refused(weight):
    with pytest.raises(ValueError, match=r"image weight must be in \[0, 1\]"):
        BNBank(("a",), {"x": torch.zeros(1, 3)}, {"x": torch.ones(1, 3)}, weight)
