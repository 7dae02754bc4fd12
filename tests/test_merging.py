"""The merge maths of the engine: exactness of the Gaussian pooling, the buffer modes, the weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from clients.site import SiteJob, adapt_site
from common.bn.stats import BNStatsConfig, collect_bn_sums, exact_bn_statistics
from common.config.run import RunConfig
from common.merge.engine import Accepted, MergeEngine
from common.models.factory import build_model
from common.scoring.predictions import CONFIDENCE_THRESHOLD
from common.updates.site import SiteUpdate, bn_layer_names
from tests.fakes import site_update


def _site(name: str, state: dict, counts: dict, n: int = 1) -> SiteUpdate:
    return site_update(name, state, num_examples=n, counts=counts)


def merge_updates(template, updates, param_weighting="uniform", buffer_mode="gaussian", weights=None):
    """The engine over a list, uncapped (the closed forms below), otherwise with the run config's defaults."""
    spec = dataclasses.replace(
        RunConfig.defaults().merge_spec(), weighting=param_weighting, buffers=buffer_mode, max_share=1.0
    )
    engine = MergeEngine(spec, template)
    for i, update in enumerate(updates):
        assert isinstance(engine.ingest(update, None if weights is None else weights[i]), Accepted)
    return engine.result()


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
    )


def test_pooled_statistics_are_exact_for_shared_parameters():
    """Same parameters, different data per site: the merge equals statistics of the pooled data."""
    model = build_model("tiny_unet", 5)
    torch.manual_seed(1)
    data = [torch.rand(6, 3, 24, 32) * 0.5, torch.rand(10, 3, 24, 32) * 0.9 + 0.1, torch.rand(4, 3, 24, 32)]
    updates = []
    for i, images in enumerate(data):
        site = build_model("tiny_unet", 5)
        site.load_state_dict(model.state_dict())
        counts = exact_bn_statistics(site, images.split(3), BNStatsConfig(mode="eval"))
        updates.append(_site(f"s{i}", site.state_dict(), counts, len(images)))
    merged = merge_updates(model.state_dict(), updates)

    pooled = build_model("tiny_unet", 5)
    pooled.load_state_dict(model.state_dict())
    exact_bn_statistics(pooled, torch.cat(data).split(3), BNStatsConfig(mode="eval"))
    expected = pooled.state_dict()
    for layer in bn_layer_names(expected):
        for leaf in ("running_mean", "running_var"):
            key = f"{layer}.{leaf}"
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-7)


def test_gaussian_merge_matches_closed_form():
    torch.manual_seed(2)
    net = _bn_net()
    states, counts = [], []
    for k in range(3):
        s = {key: v.clone() for key, v in net.state_dict().items()}
        s["1.running_mean"] = torch.randn(4)
        s["1.running_var"] = torch.rand(4) + 0.1
        states.append(s)
        counts.append({"1": torch.full((4,), 100 * (k + 1), dtype=torch.int64), "4": torch.full((2,), 7)})
    updates = [_site(f"s{k}", s, c) for k, (s, c) in enumerate(zip(states, counts, strict=True))]
    merged = merge_updates(net.state_dict(), updates)
    n = torch.tensor([100.0, 200.0, 300.0]).view(3, 1)
    mus = torch.stack([s["1.running_mean"] for s in states]).double()
    vars_ = torch.stack([s["1.running_var"] for s in states]).double()
    mu = (n * mus).sum(0) / n.sum()
    var = (n * (vars_ + (mus - mu) ** 2)).sum(0) / n.sum()
    torch.testing.assert_close(merged["1.running_mean"], mu.float())
    torch.testing.assert_close(merged["1.running_var"], var.float())


def test_average_mode_differs_from_gaussian_by_between_site_term():
    net = _bn_net()
    states = []
    for k in range(2):
        s = {key: v.clone() for key, v in net.state_dict().items()}
        s["1.running_mean"] = torch.full((4,), float(k * 2))
        s["1.running_var"] = torch.ones(4)
        states.append(s)
    counts = {"1": torch.full((4,), 10), "4": torch.full((2,), 10)}
    ups = [_site(f"s{k}", s, counts) for k, s in enumerate(states)]
    gauss = merge_updates(net.state_dict(), ups, buffer_mode="gaussian")
    avg = merge_updates(net.state_dict(), ups, buffer_mode="average")
    # means 0 and 2, equal counts: between-site variance is 1
    torch.testing.assert_close(gauss["1.running_var"] - avg["1.running_var"], torch.ones(4))
    torch.testing.assert_close(gauss["1.running_mean"], avg["1.running_mean"])


def test_reference_and_first_modes():
    net = _bn_net()
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v.clone() for k, v in net.state_dict().items()}
    a["1.running_mean"], b["1.running_mean"] = torch.zeros(4), torch.ones(4)
    a["1.num_batches_tracked"], b["1.num_batches_tracked"] = torch.tensor(1), torch.tensor(3)
    a["4.num_batches_tracked"] = b["4.num_batches_tracked"] = torch.tensor(1)
    counts = {"1": torch.full((4,), 1000), "4": torch.full((2,), 1000)}
    ref = merge_updates(net.state_dict(), [_site("a", a, counts), _site("b", b, counts)], buffer_mode="reference")
    torch.testing.assert_close(ref["1.running_mean"], torch.full((4,), 0.75))
    assert int(ref["1.num_batches_tracked"]) == 4
    b["4.num_batches_tracked"] = torch.tensor(0)  # the published rule weighs nothing by a count of 0
    engine = MergeEngine(dataclasses.replace(RunConfig.defaults().merge_spec(), buffers="reference"), a)
    refused = engine.ingest(_site("b", b, counts))
    assert not isinstance(refused, Accepted) and "4.num_batches_tracked" in refused.reason
    first = merge_updates(net.state_dict(), [_site("a", a, counts), _site("b", b, counts)], buffer_mode="first")
    torch.testing.assert_close(first["1.running_mean"], torch.zeros(4))


def test_parameter_weighting_modes():
    net = _bn_net()
    a = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    b = {k: torch.ones_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    counts = {"1": torch.full((4,), 15), "4": torch.full((2,), 15)}
    ua, ub = _site("a", a, counts, n=1), _site("b", b, counts, n=3)
    uniform = merge_updates(net.state_dict(), [ua, ub])
    assert torch.allclose(uniform["0.weight"], torch.full_like(uniform["0.weight"], 0.5))
    by_count = merge_updates(net.state_dict(), [ua, ub], param_weighting="counts")
    assert torch.allclose(by_count["0.weight"], torch.full_like(by_count["0.weight"], 0.75))
    explicit = merge_updates(net.state_dict(), [ua, ub], param_weighting="explicit", weights=[3.0, 1.0])
    assert torch.allclose(explicit["0.weight"], torch.full_like(explicit["0.weight"], 0.25))


def test_engine_is_order_independent_bitwise():
    torch.manual_seed(3)
    net = _bn_net()
    ups = []
    for k in range(5):
        s = {key: (v + torch.randn_like(v)) if v.is_floating_point() else v for key, v in net.state_dict().items()}
        s = {key: v.abs() if key.endswith("running_var") else v for key, v in s.items()}
        ups.append(_site(f"s{k}", s, {"1": torch.full((4,), 10 + k), "4": torch.full((2,), 3 + k)}))
    forward = merge_updates(net.state_dict(), ups, param_weighting="counts")
    backward = merge_updates(net.state_dict(), ups[::-1], param_weighting="counts")
    for key in forward:
        assert torch.equal(forward[key], backward[key]), key


def test_merge_keeps_dtypes_and_sums_num_batches_tracked():
    net = _bn_net()
    counts = {"1": torch.full((4,), 5), "4": torch.full((2,), 5)}
    state = net.state_dict()
    state["1.num_batches_tracked"] = torch.tensor(7)
    merged = merge_updates(state, [_site("a", state, counts), _site("b", state, counts)])
    assert merged["1.num_batches_tracked"].dtype == torch.int64 and int(merged["1.num_batches_tracked"]) == 14
    assert all(merged[k].dtype == v.dtype for k, v in state.items())


def test_empty_engine_refuses_to_give_a_result():
    engine = MergeEngine(RunConfig.defaults().merge_spec(), _bn_net().state_dict())
    with pytest.raises(ValueError, match="no site update"):
        engine.result()


def test_batch_mode_sums_split_over_batches_add_up():
    """Sums from two halves add to the sums of the whole when batching is kept."""
    torch.manual_seed(4)
    model = build_model("tiny_unet", 3)
    images = torch.rand(8, 3, 16, 16)
    whole = collect_bn_sums(model, images.split(4))
    a = collect_bn_sums(model, images[:4].split(4))
    b = collect_bn_sums(model, images[4:].split(4))
    for layer, s in whole.items():
        torch.testing.assert_close((a[layer] + b[layer]).sum, s.sum)
        assert torch.equal((a[layer] + b[layer]).count, s.count)


def test_adabn_site_update_carries_exact_counts_and_the_adapted_models_metrics(tiny_target):
    torch.manual_seed(0)
    model = build_model("tiny_unet", 9)
    with torch.no_grad():  # sharper logits: some pixels clear the confidence threshold, most do not
        model.final_layer().weight.mul_(20.0)
    update = adapt_site(model, tiny_target, SiteJob(domain="fog", batch_size=4))
    layer = bn_layer_names(update.buffers)[0]
    h, w = tiny_target[0][0].shape[-2:]
    assert int(update.counts[layer][0]) == len(tiny_target) * h * w
    assert update.num_examples == len(tiny_target)
    # the label-free metrics are those of the model the update describes, over every pixel of every image
    # (the images are equal-sized: the per-image mean is the pixel mean), not per batch, not before the pass
    sent = build_model("tiny_unet", 9)
    sent.load_state_dict(update.state_dict())
    with torch.no_grad():
        probs = sent.eval()(torch.stack([image for image, _ in tiny_target])).softmax(1).double()
    confident = float((probs.amax(1) >= CONFIDENCE_THRESHOLD).double().mean())
    entropy = float((-(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(9)).mean())
    assert 0.05 < confident < 0.5  # the case really tells the pixels apart
    assert update.metrics["confident-fraction"] == pytest.approx(confident, abs=5e-4)  # a pixel or four may flip
    assert update.metrics["mean-entropy"] == pytest.approx(entropy, rel=1e-4)
