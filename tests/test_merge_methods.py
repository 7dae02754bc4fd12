"""The merge-method registry and its streaming maths: TIES one site at a time equals TIES on all at once."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from common.merge.engine import Accepted, MergeEngine, Refused
from common.merge.methods import kth_largest
from common.merge.spec import MERGE_METHODS, MethodOptions, TiesOptions, method_options
from common.models.factory import build_model
from common.options.typed import OptionError
from common.updates.site import SiteUpdate, split_state
from tests.fakes import engine_merge, perturbed, site_update, spec


def reference_ties(base: dict, updates: list[SiteUpdate], k: float, lam: float) -> dict:
    """TIES on every task vector at once, as the TIES paper's code does it: the specification."""
    params, _ = split_state(base)
    taus = [{key: u.params[key].double() - params[key].double() for key in params} for u in updates]
    trimmed = []
    for tau in taus:
        flat = torch.cat([v.abs().reshape(-1) for v in tau.values()])
        n_keep = max(1, round(k * flat.numel()))
        if n_keep >= flat.numel():
            trimmed.append(tau)
            continue
        threshold = torch.kthvalue(flat, flat.numel() - n_keep + 1).values
        trimmed.append({key: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for key, v in tau.items()})
    out = {}
    for key in params:
        stack = torch.stack([t[key] for t in trimmed])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        mean = torch.where(agree, stack, torch.zeros_like(stack)).sum(0) / agree.sum(0).clamp_min(1)
        out[key] = (params[key].double() + lam * mean).to(params[key].dtype)
    return out


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("tiny_unet", 5).state_dict()


@pytest.mark.parametrize("num_sites", range(2, 9))
def test_streaming_ties_equals_all_at_once_ties_in_any_arrival_order(base, num_sites):
    updates = [site_update(f"s{i}", perturbed(base, seed=i + 10 * num_sites), num_examples=3 + i)
               for i in range(num_sites)]  # fmt: skip
    options = {"k": 0.2, "lam": 0.8}
    expected = reference_ties(base, updates, **options)
    rng = random.Random(num_sites)
    for _ in range(3):
        order = rng.sample(updates, len(updates))
        merged = engine_merge(base, order, method="ties", options=TiesOptions(**options))
        for key, value in expected.items():
            torch.testing.assert_close(merged[key].double(), value.double(), rtol=0, atol=1e-6)


def test_ties_keeps_ties_at_the_threshold_and_handles_keeping_everything(base):
    params, _ = split_state(base)
    flat_keys = list(params)
    a = {k: v.clone() for k, v in base.items()}
    for key in flat_keys:  # every entry moves by exactly 1: the threshold ties with all of them
        a[key] = base[key] + 1.0
    updates = [site_update("a", a), site_update("b", perturbed(base, 3))]
    for k in (0.1, 1.0):
        merged = engine_merge(base, updates, method="ties", options=TiesOptions(k=k, lam=1.0))
        expected = reference_ties(base, updates, k, 1.0)
        for key in flat_keys:
            torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["random", "ties", "zeros", "one-big-bucket", "tiny-values"])
def test_kth_largest_is_exact(case):
    rng = np.random.default_rng(0)
    values = {
        "random": rng.random(100_000),
        "ties": np.repeat(rng.random(50), 2_000),
        "zeros": np.concatenate([np.zeros(70_000), rng.random(30_000)]),
        "one-big-bucket": 1.0 + rng.random(2_500_000) * 1e-9,  # every value shares its top 16 bits
        "tiny-values": rng.random(10_000) * 1e-300,
    }[case]
    chunks = np.array_split(values, 7)
    for k in (1, 2, 17, values.size // 3, values.size):
        assert kth_largest(lambda: iter(chunks), k) == np.sort(values)[values.size - k]
    with pytest.raises(ValueError, match=f"k = {values.size + 1} exceeds the number of values"):
        kth_largest(lambda: iter(chunks), values.size + 1)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        kth_largest(lambda: iter(chunks), 0)


def test_task_arithmetic_with_lambda_one_over_k_is_the_average(base):
    updates = [site_update(f"s{i}", perturbed(base, i)) for i in range(4)]
    ta = engine_merge(base, updates, method="task-arithmetic", options=method_options("task-arithmetic", {"lam": 0.25}))
    avg = engine_merge(base, updates)
    for key in split_state(base)[0]:
        torch.testing.assert_close(ta[key], avg[key], rtol=1e-6, atol=1e-6)


def test_the_norm_clip_bounds_each_sites_change_from_the_start(base):
    far = site_update("far", perturbed(base, 1, scale=5.0))
    near = site_update("near", perturbed(base, 2, scale=1e-4))
    params, _ = split_state(base)

    def change(state: dict) -> float:
        return float(torch.sqrt(sum(((state[k].double() - base[k].double()) ** 2).sum() for k in params)))

    engine = MergeEngine(spec(clip_norm=1.0), base)
    accepted = [engine.ingest(u) for u in (far, near)]
    assert all(isinstance(a, Accepted) for a in accepted)
    assert accepted[0].clip_scale < 1.0 and accepted[1].clip_scale == 1.0
    merged = engine.result()
    assert change(merged) <= (1.0 + change(near.state_dict())) / 2 + 1e-5  # the average of two bounded changes


def test_methods_declare_their_options_and_unknown_names_are_refused():
    assert set(MERGE_METHODS) >= {"linear", "task-arithmetic", "ties"}
    assert method_options("ties", {"k": "0.1", "lambda": "0.5"}) == TiesOptions(0.1, 0.5)
    with pytest.raises(OptionError, match="did you mean 'ties'"):
        method_options("tie", {})
    with pytest.raises(OptionError, match=r"no option 'kk' \(did you mean 'k'\?\)"):
        method_options("ties", {"kk": 1})
    with pytest.raises(OptionError, match="param-weighting must be uniform"):
        spec(method="ties", options=TiesOptions(), weighting="counts")


@dataclass(frozen=True)
class AllAtOnceOptions(MethodOptions):
    streaming: ClassVar[bool] = False


def test_a_method_that_needs_every_model_at_once_is_refused_by_the_streaming_engine(base):
    MERGE_METHODS.add("all-at-once", target="common.merge.methods:TiesMerger", options=AllAtOnceOptions)
    try:
        with pytest.raises(ValueError, match="needs every model at once"):
            MergeEngine(spec(method="all-at-once", options=AllAtOnceOptions()), base)
    finally:
        MERGE_METHODS.remove("all-at-once")


def test_a_refused_update_leaves_every_methods_sums_as_they_were(base):
    good = [site_update(f"s{i}", perturbed(base, i)) for i in range(3)]
    bad = site_update("bad", perturbed(base, 9))
    bad.params[next(iter(bad.params))] = torch.full_like(next(iter(bad.params.values())), float("nan"))
    for method, options in (("linear", {}), ("task-arithmetic", {}), ("ties", {})):
        engine = MergeEngine(spec(method=method, options=method_options(method, options)), base)
        for update in good[:2]:
            engine.ingest(update)
        assert isinstance(engine.ingest(bad), Refused)
        engine.ingest(good[2])
        expected = engine_merge(base, good, method=method, options=method_options(method, options))
        assert all(torch.equal(engine.result()[k], expected[k]) for k in expected), method


def _constant(template: dict, value: float) -> dict:
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone() for k, v in template.items()}


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_layerwise_averages_the_early_layers_and_leans_to_the_anchor_with_depth(base, order):
    """Sites of all 0 and all 1, anchor b, lean from half the depth: layer at depth d holds 0.5 + 0.5·max(0, 2d - 1)."""
    updates = {"a": site_update("a", _constant(base, 0.0)), "b": site_update("b", _constant(base, 1.0))}
    options = method_options("layerwise", {"anchor": "b", "start": "0.5"})
    merged = engine_merge(base, [updates[s] for s in order], method="layerwise", options=options)
    layers = list(dict.fromkeys(key.rpartition(".")[0] for key in split_state(base)[0]))
    for key in split_state(base)[0]:
        depth = layers.index(key.rpartition(".")[0]) / (len(layers) - 1)
        expected = 0.5 + 0.5 * max(0.0, 2 * depth - 1)
        torch.testing.assert_close(merged[key], torch.full_like(merged[key], expected), rtol=0, atol=1e-7)
    assert float(merged[layers[0] + ".weight"].reshape(-1)[0]) == 0.5
    assert float(merged[layers[-1] + ".weight"].reshape(-1)[0]) == 1.0


def test_layerwise_without_its_anchor_and_bad_options_are_refused_in_one_line(base):
    updates = [site_update("a", _constant(base, 0.0)), site_update("b", _constant(base, 1.0))]
    with pytest.raises(ValueError, match="the anchor site 'c' sent no update"):
        engine_merge(base, updates, method="layerwise", options=method_options("layerwise", {"anchor": "c"}))
    for raw, message in (({}, r"name the anchor site \(anchor=SITE\)"), ({"anchor": "a", "start": 1}, "start"),
                         ({"anchor": "a", "strength": 2}, "strength must be in")):  # fmt: skip
        with pytest.raises(OptionError, match=message):
            method_options("layerwise", raw)
