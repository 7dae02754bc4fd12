"""The strategies' maths on tiny models and hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MessageType
from torch.utils.data import ConcatDataset

from clients.site import SiteJob, adapt_site, recalibration_sums
from common.bn.stats import BNStatsConfig, collect_bn_sums
from common.config.run import RunConfig
from common.data import DataSpec, build_dataset, image_batches
from common.models.factory import build_model
from common.updates.site import SiteUpdate, bn_layer_names, split_state
from common.updates.wire import sums_to_records
from experiments.compare import LocalSites
from experiments.config import ExperimentConfig
from experiments.pool import SourceBundle
from experiments.strategies import (
    STRATEGIES,
    MergeInputs,
    average_all,
    fedbn,
    gaussian,
    get_strategy,
    head_keys,
    interpolate,
    make_options,
    separate_heads,
    task_arithmetic,
    ties,
)
from server.strategy import OneShotMerge
from tests.fakes import FakeReply, fake_message, merge_config, perturbed, reply_of, site_update

SIZE = (16, 24)
BATCH = 2


def _data(style: str, n: int):
    return build_dataset(DataSpec("synthetic", domain=style, num_images=n, size=SIZE, seed=3))


@pytest.fixture(scope="module")
def source() -> SourceBundle:
    torch.manual_seed(0)
    model = build_model("tiny_unet", 9)
    # Non-trivial BN statistics and affine parameters, so that every merge rule gives a different answer.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return SourceBundle(state, "tiny_unet", [str(i) for i in range(9)], __import__("pathlib").Path("none"), "fp")


@pytest.fixture(scope="module")
def site_data():
    return {"fog": _data("fog", 4), "night": _data("night", 6)}


@pytest.fixture(scope="module")
def adabn_updates(source, site_data) -> list[SiteUpdate]:
    """AdaBN at two sites: identical parameters, exact statistics of each site's images."""
    return [
        adapt_site(source.model(), data, SiteJob(site, "adabn", batch_size=BATCH)) for site, data in site_data.items()
    ]


def _update(site: str, base: dict[str, torch.Tensor], seed: int, n: int) -> SiteUpdate:
    """A hand-made update: every float tensor moved at random, variances kept positive, n values per channel."""
    return site_update(site, perturbed(base, seed, scale=1.0), num_examples=n, per_image=1)


def _inputs(source: SourceBundle, updates: list[SiteUpdate], sites=None) -> MergeInputs:
    return MergeInputs(source.state, updates, updates, {u.site: 1 for u in updates}, {u.site: 1.0 for u in updates},
                       sites)  # fmt: skip


def test_gaussian_with_identical_parameters_reproduces_the_pooled_statistics(source, site_data, adabn_updates):
    merged = gaussian(source.state, adabn_updates)
    pooled_images = ConcatDataset(list(site_data.values()))  # sizes are multiples of BATCH: the same batches
    sums = collect_bn_sums(source.model(), image_batches(pooled_images, BATCH), BNStatsConfig("batch"))
    for layer, s in sums.items():
        torch.testing.assert_close(merged[f"{layer}.running_mean"], s.mean().float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[f"{layer}.running_var"], s.var().float(), rtol=1e-5, atol=1e-6)
    # and not what plain averaging gives: the sites' statistics really differ
    avg = average_all(source.state, adabn_updates)
    layer = next(iter(sums))
    assert not torch.allclose(avg[f"{layer}.running_var"], merged[f"{layer}.running_var"], rtol=1e-3)


def test_average_differs_from_gaussian_exactly_by_the_between_site_term(source):
    updates = [_update(f"s{i}", source.state, seed=i + 1, n=50) for i in range(3)]  # equal counts
    avg, gauss = average_all(source.state, updates), gaussian(source.state, updates)
    for layer in bn_layer_names(source.state):
        means = torch.stack([u.buffers[f"{layer}.running_mean"].double() for u in updates])
        between = ((means - means.mean(0)) ** 2).mean(0)
        torch.testing.assert_close(gauss[f"{layer}.running_mean"], avg[f"{layer}.running_mean"])
        diff = gauss[f"{layer}.running_var"].double() - avg[f"{layer}.running_var"].double()
        torch.testing.assert_close(diff, between, rtol=1e-4, atol=1e-5)
        assert bool((between > 0).all())
    params, _ = split_state(source.state)
    for key in params:
        torch.testing.assert_close(gauss[key], avg[key])


def test_count_weighting_tilts_statistics_and_equal_weighting_does_not(source):
    small, large = _update("small", source.state, 1, n=10), _update("large", source.state, 2, n=90)
    layer = bn_layer_names(source.state)[0]
    mu_s, mu_l = small.buffers[f"{layer}.running_mean"], large.buffers[f"{layer}.running_mean"]
    counted = gaussian(source.state, [small, large])[f"{layer}.running_mean"]
    equal = gaussian(source.state, [small, large], equal_sites=True)[f"{layer}.running_mean"]
    torch.testing.assert_close(counted, 0.1 * mu_s + 0.9 * mu_l)
    torch.testing.assert_close(equal, 0.5 * mu_s + 0.5 * mu_l)


def _local_sites(source, data: dict) -> LocalSites:
    """The comparison harness's sites over in-memory data (no pool, no cache)."""
    raw = {
        "source": {"checkpoint": "unused.safetensors"},
        "method": {"name": "adabn", "batch-size": BATCH},
        "sites": [{"name": s, "data": "synthetic"} for s in data],
        "eval": [{"domain": "fog", "data": "synthetic"}],
    }
    config = ExperimentConfig.from_dict(raw, "t")
    return LocalSites(config, source, pool=None, data=data, cache_dir=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode,sizes", [("eval", (3, 5)), ("batch", (4, 6))])
def test_recalibrate_equals_statistics_of_the_pooled_images_under_the_merged_parameters(source, mode, sizes):
    data = {"fog": _data("fog", sizes[0]), "night": _data("night", sizes[1])}
    updates = [_update("fog", source.state, 1, sizes[0]), _update("night", source.state, 2, sizes[1])]
    services = _local_sites(source, data)
    strategy, _ = get_strategy("recalibrate")
    outcome = strategy.load()(_inputs(source, updates, services), make_options(strategy, {"mode": mode}))
    merged = gaussian(source.state, updates)
    sums = collect_bn_sums(source.model(merged), image_batches(ConcatDataset(list(data.values())), BATCH),
                           BNStatsConfig(mode))  # fmt: skip
    for layer, s in sums.items():
        torch.testing.assert_close(outcome.state[f"{layer}.running_mean"], s.mean().float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outcome.state[f"{layer}.running_var"], s.var().float(), rtol=1e-5, atol=1e-6)
    params, _ = split_state(merged)
    for key in params:
        torch.testing.assert_close(outcome.state[key], merged[key])
    assert outcome.rounds == 2
    assert all(outcome.bytes_sent[s] > 1 for s in data)  # the update plus the second reply


class _AnsweringGrid:
    """Answers train messages with prepared updates and recalibration queries with BN sums measured on the spot."""

    def __init__(self, source: SourceBundle, updates: dict[int, SiteUpdate], data: dict[int, object]) -> None:
        self.source, self.updates, self.data = source, updates, data
        self.queue: dict[str, FakeReply] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.message_type == MessageType.TRAIN:
                reply = reply_of(self.updates[node], node)
            else:  # what the ClientApp's query handler does: BN sums under the arrays it was sent
                model = self.source.model(msg.content["arrays"].to_torch_state_dict())
                sums = recalibration_sums(model, self.data[node], BATCH, str(msg.content["config"]["bn-mode"]))
                reply = FakeReply(sums_to_records(sums, len(self.data[node]), self.updates[node].site), node)
            reply.reply_to = f"{msg.message_type}-{node}"
            self.queue[reply.reply_to] = reply
            ids.append(reply.reply_to)
        return ids

    def pull_messages(self, message_ids) -> list[FakeReply]:
        return [self.queue.pop(i) for i in message_ids if i in self.queue]


def test_recalibrate_gives_the_model_the_flower_strategys_second_round_gives(source):
    data = {"fog": _data("fog", 3), "night": _data("night", 5)}
    updates = [_update("fog", source.state, 1, 3), _update("night", source.state, 2, 5)]
    grid = _AnsweringGrid(source, {7: updates[0], 9: updates[1]}, {7: data["fog"], 9: data["night"]})
    flower = OneShotMerge(merge_config(min_sites=2, recalibrate=True), source.state, make_message=fake_message)
    flower_state = flower.start(grid, ArrayRecord(source.state)).arrays.to_torch_state_dict()
    assert flower.report.recalibration["applied"] is True
    services = _local_sites(source, data)
    strategy, _ = get_strategy("recalibrate")
    ours = strategy.load()(_inputs(source, updates, services), make_options(strategy, {})).state
    assert set(ours) == set(flower_state)
    for key, value in flower_state.items():
        assert torch.equal(ours[key], value), key  # one engine: the same bits
    gauss = gaussian(source.state, updates)  # and the second round did change the statistics
    layer = bn_layer_names(source.state)[-1]
    assert not torch.allclose(ours[f"{layer}.running_var"], gauss[f"{layer}.running_var"])


def test_recalibrate_with_equal_site_weights_averages_the_sites_moments(source):
    data = {"fog": _data("fog", 2), "night": _data("night", 6)}
    updates = [_update("fog", source.state, 1, 2), _update("night", source.state, 2, 6)]
    raw = {
        "source": {"checkpoint": "unused.safetensors"},
        "method": {"name": "adabn", "batch-size": BATCH},
        "sites": [{"name": s, "data": "synthetic"} for s in data],
        "eval": [{"domain": "fog", "data": "synthetic"}],
    }
    services = LocalSites(ExperimentConfig.from_dict(raw, "t"), source, pool=None, data=data, cache_dir=None)  # type: ignore[arg-type]
    strategy, _ = get_strategy("recalibrate")
    options = make_options(strategy, {"mode": "eval", "equal-sites": True})
    state = strategy.load()(_inputs(source, updates, services), options).state
    model = source.model(gaussian(source.state, updates, equal_sites=True))
    per_site = [collect_bn_sums(model, image_batches(d, BATCH), BNStatsConfig("eval")) for d in data.values()]
    for layer in per_site[0]:
        means = [s[layer].mean() for s in per_site]
        second = [s[layer].var() + s[layer].mean() ** 2 for s in per_site]
        mean = sum(means) / 2
        torch.testing.assert_close(state[f"{layer}.running_mean"], mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            state[f"{layer}.running_var"], (sum(second) / 2 - mean**2).float(), rtol=1e-4, atol=1e-5
        )


def test_task_arithmetic_with_lambda_one_over_m_is_the_uniform_average(source):
    updates = [_update(f"s{i}", source.state, seed=i + 1, n=10 * (i + 1)) for i in range(4)]
    ta = task_arithmetic(source.state, updates, lam=1 / 4, buffers="average")
    avg = average_all(source.state, updates)
    for key in avg:
        torch.testing.assert_close(ta[key].double(), avg[key].double(), rtol=1e-5, atol=1e-5)
    other = task_arithmetic(source.state, updates, lam=0.5, buffers="average")
    key = next(k for k in split_state(source.state)[0])
    assert not torch.allclose(other[key], avg[key])


def _ties_pair(t1: dict[str, list[float]], t2: dict[str, list[float]]) -> list[SiteUpdate]:
    pairs = (("x", t1), ("y", t2))
    return [
        site_update(s, {k: torch.tensor(v, dtype=torch.float32) for k, v in t.items()}, num_examples=1)
        for s, t in pairs
    ]


TIES_CASES = [
    # k = 0.5 keeps 3 of the 6 entries of each task vector, ranked over both tensors together:
    # τ̂1 = [1.5, 0, 0, 2 | 0, -5]; τ̂2 = [0, -4, 0, -2.5 | 0, 6]   (τ2's -2 is trimmed)
    # elected sign = sign of Σ τ̂ = [+, -, 0, -, 0, +]  (the untrimmed sum would elect - at entry 0)
    # disjoint mean over the values agreeing with it = [1.5, -4, 0, -2.5 | 0, 6]
    ([[1.5, -1.0, 0.5, 2.0], [0.2, -5.0]], [[-2.0, -4.0, 1.0, -2.5], [0.3, 6.0]], 0.5, 1.0,
     [[1.5, -4.0, 0.0, -2.5], [0.0, 6.0]]),
    # trimming ranks the whole task vector, not each tensor: here τ1's b entries push its 1.5 out
    ([[1.5, -1.0, 0.5, 2.0], [4.0, -5.0]], [[-2.0, -4.0, 1.0, -2.5], [0.3, 6.0]], 0.5, 1.0,
     [[0.0, -4.0, 0.0, -2.5], [4.0, 6.0]]),
    # agreeing values are averaged; λ scales the merged task vector
    ([[2.0, 0, 0, 0], [0, 0]], [[4.0, 0, 0, 0], [0, 0]], 1 / 6, 0.5, [[1.5, 0.0, 0.0, 0.0], [0.0, 0.0]]),
]  # fmt: skip


@pytest.mark.parametrize(("t1", "t2", "k", "lam", "want"), TIES_CASES)
def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(t1, t2, k, lam, want):
    base = {"a.weight": torch.zeros(4), "b.weight": torch.zeros(2)}
    names = ("a.weight", "b.weight")
    merged = ties(base, _ties_pair(dict(zip(names, t1, strict=True)), dict(zip(names, t2, strict=True))), k=k, lam=lam)
    for name, values in zip(names, want, strict=True):
        torch.testing.assert_close(merged[name], torch.tensor(values))


def test_fedbn_and_separate_heads_keep_each_domains_own_parts(source):
    updates = [_update("fog", source.state, 1, 10), _update("night", source.state, 2, 30)]
    per_site = fedbn(source.state, updates)
    avg = average_all(source.state, updates)
    layer = bn_layer_names(source.state)[0]
    conv = next(k for k in source.state if k.endswith(".weight") and source.state[k].dim() == 4)
    for u in updates:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            torch.testing.assert_close(per_site[u.site][f"{layer}.{leaf}"], u.state_dict()[f"{layer}.{leaf}"])
        torch.testing.assert_close(per_site[u.site][conv], avg[conv])
    heads = separate_heads(source.state, updates)
    merged = gaussian(source.state, updates)
    for u in updates:
        for key in head_keys(source.state):
            torch.testing.assert_close(heads[u.site][key], u.state_dict()[key])
        torch.testing.assert_close(heads[u.site][conv], merged[conv])
    assert all(STRATEGIES.get(name).options.test_time_domain for name in ("fedbn", "separate-heads"))


def test_interpolation_ends_at_the_sites_and_the_gaussian_rule_adds_the_spread(source):
    a, b = _update("a", source.state, 1, 10), _update("b", source.state, 2, 10)
    for rule in ("linear", "gaussian"):
        for key, value in interpolate(a, b, 0.0, rule).items():
            torch.testing.assert_close(value, a.state_dict()[key])
        for key, value in interpolate(a, b, 1.0, rule).items():
            torch.testing.assert_close(value, b.state_dict()[key])
    layer = bn_layer_names(source.state)[0]
    lin, gau = interpolate(a, b, 0.5, "linear"), interpolate(a, b, 0.5, "gaussian")
    spread = 0.25 * (a.buffers[f"{layer}.running_mean"] - b.buffers[f"{layer}.running_mean"]) ** 2
    torch.testing.assert_close(gau[f"{layer}.running_var"] - lin[f"{layer}.running_var"], spread, rtol=1e-4, atol=1e-6)
    # at alpha = 1/2 with equal counts the Gaussian point is the gaussian merge
    torch.testing.assert_close(gau[f"{layer}.running_var"], gaussian(source.state, [a, b])[f"{layer}.running_var"])


def test_registry_options_are_typed_and_checked():
    strategy, implied = get_strategy("single:fog")
    assert make_options(strategy, implied).site == "fog"
    ties_strategy, _ = get_strategy("ties")
    options = make_options(ties_strategy, {"k": 0.1, "lambda": 0.7})
    assert (options.k, options.lam) == (0.1, 0.7)
    with pytest.raises(ValueError, match="no option"):
        make_options(ties_strategy, {"topk": 0.1})
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("soup")
    with pytest.raises(ValueError, match=r"k \(fraction"):
        ties({"w": torch.zeros(1)}, [site_update("x", {"w": torch.ones(1)}, num_examples=1)], k=0.0, lam=1.0)


class _ScoresByLastLayer:
    """Sites whose label-free score is the mean of the model's last parameter: known for every candidate."""

    def __init__(self, key: str) -> None:
        self.key, self.asked = key, 0

    def label_free(self, state, bank):
        self.asked += 1
        value = float(state[self.key].double().mean())
        return {"confident": {"a": value, "b": value + 1.0}, "mix": {"a": 0.0, "b": 0.0}}


def _constant_updates(source):
    def fill(value: float) -> dict:
        return {k: torch.full_like(t, value) if t.is_floating_point() else t.clone() for k, t in source.state.items()}

    return [site_update("a", fill(0.0)), site_update("b", fill(1.0))]


def test_layerwise_select_keeps_the_candidate_whose_worst_site_scores_best(source):
    """Last layer: default 0.5, anchor a 0.0, anchor b 1.0; a score by it picks b, a constant score the default."""
    updates = _constant_updates(source)
    last = list(split_state(source.state)[0])[-1]
    strategy, _ = get_strategy("layerwise-select")
    services = _ScoresByLastLayer(last)
    outcome = strategy.load()(_inputs(source, updates, services), make_options(strategy, {}))
    assert services.asked == 3 and outcome.notes.startswith("chose anchor=b by the worst site's confident")
    assert float(outcome.state[last].reshape(-1)[0]) == 1.0
    first = next(iter(split_state(source.state)[0]))
    assert float(outcome.state[first].reshape(-1)[0]) == 0.5  # the first layer is averaged whatever the anchor
    constant = strategy.load()(_inputs(source, updates, services), make_options(strategy, {"score": "mix"}))
    assert constant.notes.startswith("chose default") and float(constant.state[last].reshape(-1)[0]) == 0.5
    with pytest.raises(ValueError, match="score must be one of"):
        make_options(strategy, {"score": "accuracy"})


def test_image_weight_ships_the_right_bank_with_each_row(source):
    updates = [_update("fog", source.state, 1, 4), _update("night", source.state, 2, 6)]
    inputs = _inputs(source, updates)
    merge, _ = get_strategy("merge")
    default = merge.load()(inputs, make_options(merge, {}))  # as a run with the default config ships it
    assert (default.bank.names, default.bank.image_weight) == (("merged",), RunConfig.defaults().bn_image_weight)
    plain = merge.load()(inputs, make_options(merge, {"image-weight": 0.0}))
    assert plain.bank is None
    mixed = merge.load()(inputs, make_options(merge, {"image-weight": 0.3}))
    layer = bn_layer_names(source.state)[0]
    assert mixed.bank.names == ("merged",) and mixed.bank.image_weight == 0.3
    assert torch.equal(mixed.bank.mean[layer][0], plain.state[f"{layer}.running_mean"])
    banked = merge.load()(inputs, make_options(merge, {"bank": True, "image-weight": 0.3}))
    assert banked.bank.names == ("fog", "night") and banked.bank.image_weight == 0.3
    only, _ = get_strategy("source-only")
    start = only.load()(inputs, make_options(only, {"image-weight": 0.5}))
    assert torch.equal(start.bank.var[layer][0], source.state[f"{layer}.running_var"])
    assert only.load()(inputs, make_options(only, {})).bank is None  # the start mixes in nothing unless asked
    single, implied = get_strategy("single:night")
    site = single.load()(inputs, make_options(single, {**implied, "image-weight": 0.2}))
    assert (site.bank.names, site.bank.image_weight) == (("night",), 0.2)
    assert torch.equal(site.bank.mean[layer][0], updates[1].state_dict()[f"{layer}.running_mean"])
    for strategy in (merge, only, single, get_strategy("recalibrate")[0], get_strategy("data-combination")[0]):
        with pytest.raises(ValueError, match=r"image-weight must be in \[0, 1\]"):
            make_options(strategy, {**implied, "image-weight": 1.5} if strategy is single else {"image-weight": 1.5})
