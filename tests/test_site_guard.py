"""The site guard (clients/guard.py): a site whose adaptation harms its own images sends its start instead."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clients.adaptation import METHODS, AdaptContext
from clients.adaptation.configs import MethodConfig
from clients.guard import FELL_BACK, GuardConfig, guard_adaptation
from clients.site import SiteJob, adapt_site
from common.config.run import ConfigError, RunConfig
from common.models.factory import build_model
from common.scoring.scores import SCORES

SIZE = (32, 48)
NUM_CLASSES = 9
HEAD = "classifier.1.weight"  # tiny_unet's final layer


@pytest.fixture(scope="module")
def start_state(tiny_pretrained_state):
    return tiny_pretrained_state  # predictions with classes and structure an adaptation can destroy


@pytest.fixture(scope="module")
def target(tiny_target):
    return tiny_target  # conftest's: six synthetic fog images of 32x48


@torch.no_grad()
def _noise(model, target, context, config) -> None:
    """Harm by construction: every parameter replaced by seeded noise of its own scale."""
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * p.std().clamp_min(0.1))


@torch.no_grad()
def _collapse(model, target, context, config) -> None:
    """Harm by construction: class 0 everywhere (confident, consistent, and wrong)."""
    model.final_layer().bias[0] += 100.0


@torch.no_grad()
def _non_finite(model, target, context, config) -> None:
    model.final_layer().weight.fill_(float("nan"))


@torch.no_grad()
def _sharpen(model, target, context, config) -> None:
    """Harmless by construction: the logits doubled, so every label and the BN statistics stay exactly the same."""
    model.final_layer().weight.mul_(2.0)
    model.final_layer().bias.mul_(2.0)


TEST_METHODS = {"test-noise": _noise, "test-collapse": _collapse, "test-nan": _non_finite, "test-sharpen": _sharpen}


@pytest.fixture(scope="module", autouse=True)
def _test_methods():
    for name, fn in TEST_METHODS.items():
        METHODS.add(name, target=f"tests.test_site_guard:{fn.__name__}", options=MethodConfig, summary="test only")
    yield
    for name in TEST_METHODS:
        METHODS.remove(name)


def _model(state):
    model = build_model("tiny_unet", NUM_CLASSES)
    model.load_state_dict(state)
    return model


def _guard(**values) -> GuardConfig:
    return GuardConfig.read({"guard": True, **values})


def _site(state, target, method: str, guard: GuardConfig | None = None, options: dict | None = None):
    guard = guard or GuardConfig.read()
    job = SiteJob("fog", method, options or {}, 4, context=AdaptContext(progress=False), guard=guard)
    return adapt_site(_model(state), target, job)


@pytest.fixture(scope="module")
def start_update(start_state, target):
    """What the site sends when it does not adapt at all: the start with its exact statistics on the images."""
    return _site(start_state, target, "adabn")


def _assert_same(update, reference) -> None:
    assert update.params.keys() == reference.params.keys()
    assert all(torch.equal(update.params[k], reference.params[k]) for k in reference.params)
    assert all(torch.equal(update.buffers[k], reference.buffers[k]) for k in reference.buffers)
    assert all(torch.equal(update.counts[k], reference.counts[k]) for k in reference.counts)


DESTRUCTIVE_TENT = {"steps": 10, "lr": 1.0}  # a thousand times tent's rate
GENTLE_TENT = {"steps": 5, "lr": 1e-3}


@pytest.mark.parametrize(
    ("method", "options", "guard"),
    [("test-noise", {}, {"guard-score": "mix", "guard-margin": 0}),
     ("test-collapse", {}, {"guard-score": "diversity"}),
     ("test-collapse", {}, {"guard-score": "mix,diversity", "guard-margin": 0}),
     ("test-collapse", {}, {}),
     ("test-nan", {}, {"guard-score": "mix"}),
     ("tent", DESTRUCTIVE_TENT, {})],
)  # fmt: skip
def test_harmful_adaptation_falls_back_to_the_start_with_its_exact_statistics(
    start_state, target, start_update, method, options, guard
):
    unguarded = _site(start_state, target, method, options=options)
    assert not all(torch.equal(unguarded.params[k], start_update.params[k]) for k in start_update.params)
    update = _site(start_state, target, method, _guard(**guard), options)
    _assert_same(update, start_update)
    assert update.metrics[FELL_BACK] == 1.0


def test_destructive_self_training_raises_the_consistency_scores(start_state, target):
    """Why the default score is agreement with the start: a run towards a few classes looks more consistent."""
    m = _site(start_state, target, "tent", _guard(), DESTRUCTIVE_TENT).metrics
    assert m[FELL_BACK] == 1.0 and m["guard-adapted-agreement"] < 1 - 0.2
    for name in ("mix", "confident", "neg-entropy"):
        assert m[f"guard-adapted-{name}"] > m[f"guard-start-{name}"], name


def test_a_collapsed_model_fools_mix_alone(start_state, target):
    """Pasting classes onto a one-class prediction changes nothing: mix alone cannot see collapse."""
    update = _site(start_state, target, "test-collapse", _guard(**{"guard-score": "mix"}))
    assert update.metrics[FELL_BACK] == 0.0
    assert update.metrics["guard-adapted-mix"] == 1.0 > update.metrics["guard-start-mix"]


def test_harmless_adaptation_is_kept(start_state, target, start_update):
    unguarded = _site(start_state, target, "test-sharpen")
    exact = {"guard-score": "mix,agreement,photometric", "guard-margin": 0}  # the labels do not change at all
    update = _site(start_state, target, "test-sharpen", _guard(**exact))
    _assert_same(update, unguarded)
    assert not torch.equal(update.params[HEAD], start_update.params[HEAD])
    assert update.metrics[FELL_BACK] == 0.0
    assert update.metrics["guard-adapted-agreement"] == 1.0


def test_a_few_gentle_steps_are_kept_under_the_default_guard(start_state, target, start_update):
    unguarded = _site(start_state, target, "tent", options=GENTLE_TENT)
    update = _site(start_state, target, "tent", _guard(), GENTLE_TENT)
    _assert_same(update, unguarded)
    assert not all(torch.equal(update.params[k], start_update.params[k]) for k in start_update.params)
    assert update.metrics[FELL_BACK] == 0.0 and update.metrics["guard-adapted-agreement"] < 1.0


def test_adabn_is_its_own_start_and_is_kept(start_state, target, start_update):
    update = _site(start_state, target, "adabn", _guard())
    _assert_same(update, start_update)
    assert update.metrics[FELL_BACK] == 0.0
    assert update.metrics["guard-adapted-mix"] == update.metrics["guard-start-mix"]


MIX = {"guard-score": "mix", "guard-margin": 0}


def test_the_margin_lets_a_small_drop_through(start_state, target):
    model = _model(start_state)
    _noise(model, target, None, None)
    harsh = guard_adaptation(_model(model.state_dict()), start_state, target, _guard(**MIX), batch_size=4)
    drop = harsh.start["mix"] - harsh.adapted["mix"]
    assert harsh.fell_back and drop > 0
    noisy = {k: v.clone() for k, v in model.state_dict().items()}
    lenient = _guard(**{**MIX, "guard-margin": drop + 1e-3})
    lenient = guard_adaptation(model, start_state, target, lenient, batch_size=4)
    assert not lenient.fell_back and lenient.adapted["mix"] == harsh.adapted["mix"]
    assert all(torch.equal(v, noisy[k]) for k, v in model.state_dict().items())  # kept as adapted, untouched


def test_decision_and_every_score_reach_the_update_as_float_scalars(start_state, target):
    from common.updates.wire import records_to_update, update_to_records

    update = _site(start_state, target, "test-noise", _guard())
    received = records_to_update(update_to_records(update, "test-noise"), "x").metrics
    for name in SCORES:
        assert isinstance(received[f"guard-start-{name}"], float)
        assert isinstance(received[f"guard-adapted-{name}"], float)
    assert received[FELL_BACK] == 1.0 and received["guard-seconds"] > 0
    assert received["guard-adapted-mix"] < received["guard-start-mix"]
    assert received["guard-start-agreement"] == 1.0  # the start agrees with itself: agreement is a drift bound


def test_a_guard_that_is_off_measures_nothing(start_state, target):
    update = _site(start_state, target, "test-noise")
    assert not any(k.startswith("guard-") for k in update.metrics)


def test_the_pool_guards_its_sites_and_keys_them_apart(start_state, target, start_update, tmp_path):
    from experiments.config import LocalMethod
    from experiments.pool import EMA_FROM_TRAIN_PASS, ModelPool, SourceBundle, adapt_with_ema

    job = SiteJob("fog", "test-noise", {}, 4, context=AdaptContext(progress=False), guard=_guard())
    update, _, note = adapt_with_ema(_model(start_state), target, job)
    _assert_same(update, start_update)
    assert note == EMA_FROM_TRAIN_PASS  # the start's weights are back: no EMA statistics of the method's

    source = SourceBundle(start_state, "tiny_unet", [str(i) for i in range(NUM_CLASSES)], tmp_path, "f" * 20)
    keys = {ModelPool(source, LocalMethod("adabn", guard=g), 0, tmp_path).key("d")
            for g in (GuardConfig.read(), _guard(), _guard(**{"guard-margin": 0.1}))}  # fmt: skip
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("options", "rule", "alpha"),
    [
        (DESTRUCTIVE_TENT, {}, 0.0),
        (GENTLE_TENT, {}, 1.0),
        (GENTLE_TENT, {"guard-rule": "interpolate", "guard-margin": 0}, 0.5),
    ],
)
def test_a_guarded_pool_entry_is_the_inline_guard_bit_for_bit(start_state, target, tmp_path, monkeypatch, options,
                                                              rule, alpha):  # fmt: skip
    """The pool guards its cached unguarded adaptation instead of adapting again; the result must not differ."""
    from experiments.config import LocalMethod
    from experiments.pool import ModelPool, SourceBundle, adapt_with_ema

    if rule:  # a score that peaks at the midpoint, so that the inner point is the one sent
        torch.manual_seed(0)
        tent = _model(start_state)
        METHODS.get("tent").load()(tent, target, AdaptContext(progress=False, seed=0),
                                    METHODS.get("tent").make_options(options))  # fmt: skip
        import clients.guard as guard_module

        monkeypatch.setattr(guard_module, "_scores", _peaked_at_half(start_state, tent.state_dict()))
    guard = _guard(**rule)
    torch.manual_seed(0)
    job = SiteJob("fog", "tent", options, 4, context=AdaptContext(progress=False, seed=0), guard=guard)
    inline, inline_ema, inline_note = adapt_with_ema(_model(start_state), target, job)
    assert inline.metrics["guard-alpha"] == alpha

    source = SourceBundle(start_state, "tiny_unet", [str(i) for i in range(NUM_CLASSES)], tmp_path, "f" * 20)
    plain = ModelPool(source, LocalMethod("tent", options, batch_size=4), 0, tmp_path).get("fog", target, "d")
    guarded_pool = ModelPool(source, LocalMethod("tent", options, batch_size=4, guard=guard), 0, tmp_path)
    derived = guarded_pool.get("fog", target, "d")
    assert guarded_pool.computed == [derived.key] and derived.key != plain.key
    _assert_same(derived.update, inline)
    assert derived.ema_note == inline_note
    assert all(torch.equal(derived.ema_buffers[k], inline_ema[k]) for k in inline_ema)
    timing = ("adapt-seconds", "bn-seconds", "guard-seconds")
    assert {k: v for k, v in derived.update.metrics.items() if k not in timing} == {
        k: v for k, v in inline.metrics.items() if k not in timing
    }
    again = ModelPool(source, LocalMethod("tent", options, batch_size=4, guard=guard), 0, tmp_path)
    _assert_same(again.get("fog", target, "d").update, inline)  # read back from the cache
    assert again.computed == []


def test_the_run_config_and_node_config_set_the_guard():
    from clients.config import SiteConfig

    run = {"guard": True, "guard-score": "mix,diversity", "site-data": "synthetic?domain=fog"}
    site = SiteConfig.from_flower(run, {"partition-id": 0, "guard-margin": 0.05})
    assert site.job().guard == GuardConfig(True, ("mix", "diversity"), 0.05)
    assert SiteConfig.from_flower({}, {"partition-id": 0}).job().guard.enabled is False


@pytest.mark.parametrize(
    ("values", "message"),
    [({"guard-score": "confidnt"}, "did you mean 'confident'"), ({"guard-score": "mix,bogus"}, "'bogus'"),
     ({"guard-score": ""}, "guard-score"), ({"guard-margin": -0.1}, "guard-margin must be >= 0"),
     ({"guard": "yes"}, "true or false"), ({"guard-rule": "interpolat"}, "did you mean 'interpolate'"),
     ({"guard-max-change": 0.0}, "guard-max-change must be in"), ({"guard-max-change": 1.5}, "guard-max-change")],
)  # fmt: skip
def test_bad_guard_settings_are_refused_with_one_line(values, message):
    for read in (GuardConfig.read, RunConfig.read):
        with pytest.raises(ConfigError, match=message) as info:
            read(values)
        assert "\n" not in str(info.value)


def test_the_run_config_checks_score_names_on_the_registry_without_torch():
    probe = (
        "import sys\nfrom common.config.run import ConfigError, RunConfig\n"
        "try:\n    RunConfig.read({'guard-score': 'agreement,mixx'})\nexcept ConfigError as e:\n    print(e)\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert "did you mean 'mix'" in out and "TORCH False" in out, out


def test_the_experiment_config_and_the_command_line_take_the_guard(tmp_path, capsys):
    from experiments.config import ExperimentConfig
    from fedmerge.cli import main

    def experiment(method: dict) -> ExperimentConfig:
        data = "synthetic?n=2"
        raw = {"source": {"checkpoint": "x.safetensors"}, "sites": [{"name": "a", "data": data}],
               "eval": [{"domain": "a", "data": data}], "strategies": ["merge"], "method": method}  # fmt: skip
        return ExperimentConfig.from_dict(raw, "x")

    guard = experiment({"guard": True, "guard-score": "diversity", "guard-margin": 0.3}).method.guard
    assert guard == GuardConfig(True, ("diversity",), 0.3)
    assert experiment({}).method.guard.enabled is False
    with pytest.raises(ConfigError, match="did you mean 'mix'"):
        experiment({"guard-score": "mixx"})
    code = main(["adapt", "--method", "adabn", "--model", "x", "--data", "synthetic?n=2", "--out", "y",
                 "--guard", "--guard-score", "bogus"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "guard-score" in err and "'bogus'" in err and "\n" not in err


def _parameter_sum(state) -> float:
    names = {name for name, _ in _model(state).named_parameters()}
    return float(sum(state[k].double().sum() for k in names))


def _peaked_at_half(start_state, adapted_state):
    """A stand-in score that peaks at the midpoint of the line: minus the squared distance of the sum of the
    parameters (linear along the line) to its value there."""
    mid = (_parameter_sum(start_state) + _parameter_sum(adapted_state)) / 2

    def scores(candidate, start, target, batch_size, seed):
        return dict.fromkeys(SCORES.names(), -((_parameter_sum(candidate.state_dict()) - mid) ** 2))

    return scores


def test_interpolate_sends_the_point_its_score_rates_best(start_state, target, monkeypatch):
    import clients.guard as guard_module
    from clients.guard import interpolated

    adapted = _model(start_state)
    _sharpen(adapted, target, None, None)  # a known change of the head only
    adapted_state = {k: v.clone() for k, v in adapted.state_dict().items()}
    monkeypatch.setattr(guard_module, "_scores", _peaked_at_half(start_state, adapted_state))
    config = _guard(**{"guard-rule": "interpolate", "guard-score": "mix", "guard-margin": 0})
    decision = guard_adaptation(adapted, start_state, target, config, batch_size=4)
    assert (decision.alpha, decision.fell_back) == (0.5, False) and set(decision.points) == {0.25, 0.5, 0.75}
    expected = interpolated(start_state, dict(_model(adapted_state).named_parameters()), 0.5)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(adapted.state_dict()[HEAD], (start_state[HEAD] + adapted_state[HEAD]) / 2)
    assert decision.metrics()["guard-alpha"] == 0.5 and "guard-point-0.25" in decision.metrics()
    again = _model(adapted_state)
    far = _guard(**{"guard-rule": "interpolate", "guard-score": "mix", "guard-margin": 100.0})
    assert guard_adaptation(again, start_state, target, far, batch_size=4).alpha == 1.0  # no point leads by 100
    assert all(torch.equal(again.state_dict()[k], v) for k, v in adapted_state.items())


def test_interpolate_with_agreement_keeps_a_label_preserving_change_and_refuses_any_other(start_state, target):
    """Agreement with the start is 1 at the start: under interpolate it wins unless the adapted model ties it."""
    rule = {"guard-rule": "interpolate", "guard-margin": 0}
    assert _site(start_state, target, "test-sharpen", _guard(**rule)).metrics["guard-alpha"] == 1.0
    harmed = _site(start_state, target, "test-collapse", _guard(**rule))
    assert harmed.metrics["guard-alpha"] == 0.0 and harmed.metrics[FELL_BACK] == 1.0


def _shipped_camvid_guard() -> GuardConfig:
    from experiments.config import ExperimentConfig
    from experiments.shipped import resolve_config_path

    return ExperimentConfig.load(resolve_config_path("camvid-c"), data_root="unused").method.guard


@pytest.mark.parametrize(("method", "options"), [("tent", DESTRUCTIVE_TENT), ("test-collapse", {})])
def test_the_shipped_camvid_guard_falls_back_on_a_harmful_adaptation(start_state, target, start_update, method,
                                                                     options):  # fmt: skip
    """The CamVid configs pick a point by photometric consistency, which a run towards a few classes raises."""
    guard = _shipped_camvid_guard()
    assert (guard.enabled, guard.rule, guard.scores[0]) == (True, "interpolate", "photometric")
    unlimited = _site(start_state, target, method, GuardConfig(**{**vars(guard), "max_change": 1.0}), options)
    assert unlimited.metrics["guard-alpha"] > 0.0  # without the change limit it moves towards the harmful model
    update = _site(start_state, target, method, guard, options)
    _assert_same(update, start_update)
    assert update.metrics[FELL_BACK] == 1.0 and update.metrics["guard-adapted-agreement"] < 1.0 - guard.max_change


def test_the_change_limit_refuses_an_adapted_model_under_fallback_too(start_state, target, start_update):
    update = _site(start_state, target, "tent", _guard(**{"guard-score": "mix", "guard-max-change": 0.3}),
                   DESTRUCTIVE_TENT)  # fmt: skip
    _assert_same(update, start_update)
    assert update.metrics[FELL_BACK] == 1.0
