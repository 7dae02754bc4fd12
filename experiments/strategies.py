"""The strategy registry: how the same site updates become the model(s) that get evaluated.

Each strategy is a function of (shared start, site updates, typed options). Every merge
goes through the one merge engine (``common.merge.engine``) with a :class:`MergeSpec`, so
a row of the comparison is exactly what ``fedmerge merge`` and the ServerApp would
produce with the same method. A few strategies cannot be computed from the updates
alone: ``recalibrate`` asks every site again (BN sums under the merged parameters),
``data-combination`` needs all targets' images in one place and ``fedavg-rounds`` trains
over several rounds. They reach the sites through :class:`SiteServices`, which the
orchestrator provides, so the maths here stays pure.

Strategies are entries of one :class:`~common.options.registry.Registry`, like merge and
adaptation methods; every registered merge method is also a row of its own, its options
read from the merge-method registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from common.bn.bank import BNBank
from common.bn.stats import BNSums
from common.config.run import RunConfig, bank_source
from common.merge.engine import MergeEngine, Refused
from common.merge.spec import MERGE_METHODS, MergeSpec, method_options
from common.options.registry import Entry, Registry
from common.options.typed import parse_key_values
from common.scoring.scores import SCORES
from common.updates.site import SiteUpdate, bn_layer_names, split_state

__all__ = [
    "STRATEGIES",
    "MergeInputs",
    "Outcome",
    "SiteServices",
    "StrategyOptions",
    "average_all",
    "bn_keys",
    "fedbn",
    "gaussian",
    "get_strategy",
    "head_keys",
    "interpolate",
    "make_options",
    "merge",
    "merge_spec",
    "params_only",
    "reference",
    "separate_heads",
    "task_arithmetic",
    "ties",
]

State = dict[str, Tensor]


def _check_updates(updates: Sequence[SiteUpdate]) -> None:
    if not updates:
        raise ValueError("no site updates to merge")


# ----------------------------------------------------------------------------- merges, through the engine


def merge_spec(method: str = "linear", options: Mapping[str, Any] | None = None, **changes: Any) -> MergeSpec:
    """The run config's default merge with ``method``, its ``options`` and other fields changed.

    A named row is the maths its name says (``gaussian``: pooled by counts), so the cap
    on a site's share is off unless ``changes`` set it; the ``merge`` row takes every
    default of a real run, the cap included.
    """
    base = RunConfig.defaults().merge_spec()
    changes = {"max_share": 1.0, **changes}
    return dataclasses.replace(base, method=method, options=method_options(method, options or {}), **changes)


def merge(
    base: Mapping[str, Tensor], updates: Sequence[SiteUpdate], spec: MergeSpec, weights: Sequence[float] | None = None
) -> State:
    """Every update through one :class:`MergeEngine`; a refused update is an error here (inputs are ours)."""
    _check_updates(updates)
    engine = MergeEngine(spec, base)
    claims = weights if weights is not None else [float(u.num_examples) for u in updates]
    if spec.weighting != "uniform" and spec.max_share < 1.0:
        engine.expect_weights(claims)
    for i, update in enumerate(updates):
        _accept(engine.ingest(update, None if weights is None else weights[i]))
    return engine.result()


def average_all(base: Mapping[str, Tensor], updates: Sequence[SiteUpdate]) -> State:
    """Every tensor averaged like a weight, BN statistics included: FedAvg's and the toolkits' rule."""
    return merge(base, updates, merge_spec(buffers="average"))


def params_only(base: Mapping[str, Tensor], updates: Sequence[SiteUpdate]) -> State:
    """Parameters averaged, the first site's BN statistics kept: the published default without buffer merging."""
    return merge(base, updates, merge_spec(buffers="first"))


def reference(base: Mapping[str, Tensor], ema_updates: Sequence[SiteUpdate]) -> State:
    """The published buffer merge: Gaussian pooling with n = ``num_batches_tracked`` on EMA statistics.

    Give it the updates whose buffers are the sites' EMA running statistics, as the
    published code would find them in the checkpoints it merges.
    """
    return merge(base, ema_updates, merge_spec(buffers="reference"))


def gaussian(
    base: Mapping[str, Tensor], updates: Sequence[SiteUpdate], weighting: str = "uniform", equal_sites: bool = False
) -> State:
    """Parameters averaged (``uniform`` or by ``counts``); BN statistics pooled as Gaussians.

    With exact statistics and sample counts the pooled mean and variance are those of the
    union of the sites' values (as each site's parameters saw them); ``equal_sites``
    gives every site the same weight in that pooling instead of its sample count.
    """
    spec = merge_spec(buffers="gaussian", weighting=weighting, equal_site_stats=equal_sites)
    return merge(base, updates, spec)


def task_arithmetic(
    base: Mapping[str, Tensor], updates: Sequence[SiteUpdate], lam: float, buffers: str = "average"
) -> State:
    """θ₀ + λ Σ τ_i on the parameters; BN buffers by ``buffers`` (the toolkits average them)."""
    return merge(base, updates, merge_spec("task-arithmetic", {"lam": lam}, buffers=buffers))


def ties(
    base: Mapping[str, Tensor], updates: Sequence[SiteUpdate], k: float, lam: float, buffers: str = "average"
) -> State:
    """TIES-Merging (streaming form): trim each τ_i to its top-k, elect a sign, average the agreeing values."""
    return merge(base, updates, merge_spec("ties", {"k": k, "lam": lam}, buffers=buffers))


def bn_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Every tensor of every BN layer: affine weight and bias, running statistics, batch count."""
    leaves = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return [f"{layer}.{leaf}" for layer in bn_layer_names(state) for leaf in leaves if f"{layer}.{leaf}" in state]


def head_keys(state: Mapping[str, Tensor], prefix: str = "classifier.") -> list[str]:
    """The decode head's tensors (``Segmenter.classifier``), parameters and buffers alike."""
    keys = [k for k in state if k.startswith(prefix)]
    if not keys:
        raise ValueError(f"no tensor starts with {prefix!r}: cannot separate the head")
    return keys


# ----------------------------------------------------------------------------- per-domain models


def fedbn(base: Mapping[str, Tensor], updates: Sequence[SiteUpdate]) -> dict[str, State]:
    """FedBN: everything but BN averaged; each domain keeps its own BN layers (affine and statistics)."""
    _check_updates(updates)
    shared = average_all(base, updates)
    local = bn_keys(base)
    return {u.site: {**shared, **{k: u.state_dict()[k].clone() for k in local}} for u in updates}


def separate_heads(
    base: Mapping[str, Tensor], updates: Sequence[SiteUpdate], head_prefix: str = "classifier."
) -> dict[str, State]:
    """Backbone merged (parameters averaged, BN Gaussian-pooled); each domain keeps its own decode head."""
    shared = gaussian(base, updates)
    heads = head_keys(base, head_prefix)
    return {u.site: {**shared, **{k: u.state_dict()[k].clone() for k in heads}} for u in updates}


# ----------------------------------------------------------------------------- statistics


def interpolate(a: SiteUpdate, b: SiteUpdate, alpha: float, buffers: str = "gaussian") -> State:
    """The model at ``alpha`` on the line from site a (0) to site b (1).

    Parameters: (1-alpha)·θ_a + alpha·θ_b. BN statistics: ``linear`` interpolates mean and variance
    like weights; ``gaussian`` takes the moments of the mixture with weights (1-alpha, alpha), which
    adds the between-model term alpha(1-alpha)(μ_a - μ_b)² to the variance. Both agree at the ends.
    """
    if buffers not in ("linear", "gaussian"):
        raise ValueError(f"buffers must be linear or gaussian, not {buffers!r}")
    sa, sb = a.state_dict(), b.state_dict()
    out: State = {}
    for key, va in sa.items():
        vb = sb[key]
        if key.endswith(".num_batches_tracked"):
            out[key] = va.clone() if alpha < 0.5 else vb.clone()
            continue
        out[key] = ((1 - alpha) * va.double() + alpha * vb.double()).to(va.dtype)
    if buffers == "gaussian":
        for layer in bn_layer_names(sa):
            ma, mb = sa[f"{layer}.running_mean"].double(), sb[f"{layer}.running_mean"].double()
            va, vb = sa[f"{layer}.running_var"].double(), sb[f"{layer}.running_var"].double()
            var = (1 - alpha) * va + alpha * vb + alpha * (1 - alpha) * (ma - mb) ** 2
            out[f"{layer}.running_var"] = var.to(sa[f"{layer}.running_var"].dtype)
    return out


# ----------------------------------------------------------------------------- registry


class SiteServices(Protocol):
    """What a strategy may ask of the sites beyond their one-shot updates (see ``experiments.compare``)."""

    def bn_sums(self, site: str, state: Mapping[str, Tensor], mode: str) -> tuple[dict[str, BNSums], int, float]:
        """A site's BN sums under ``state`` on its own images, the bytes of that reply, and its seconds."""
        ...

    def combined(self) -> tuple[SiteUpdate, dict[str, int], float]:
        """One model adapted on every target's images together, the image bytes each site gave up, seconds."""
        ...

    def fedavg(self, rounds: int, split_steps: bool, buffers: str) -> Outcome:
        """FedAvg over ``rounds`` rounds of the same local method, through Flower."""
        ...

    def label_free(self, state: Mapping[str, Tensor], bank: BNBank | None) -> dict[str, dict[str, float]]:
        """Every label-free score of one model at each site (score -> site -> value): a selection round's replies."""
        ...


@dataclass
class MergeInputs:
    """The same inputs for every strategy: the shared start and each site's one update."""

    base: State  # the source model every site started from
    updates: list[SiteUpdate]  # exact statistics and sample counts, in the config's site order
    ema_updates: list[SiteUpdate]  # same parameters, the EMA running statistics the published code would see
    update_bytes: dict[str, int]  # what each site's update weighs on the wire
    adapt_seconds: dict[str, float]  # each site's adaptation time
    sites: SiteServices | None = None

    def update(self, site: str) -> SiteUpdate:
        for u in self.updates:
            if u.site == site:
                return u
        raise KeyError(f"no update from site {site!r}; sites: {', '.join(u.site for u in self.updates)}")


@dataclass
class Outcome:
    """A strategy's result: one model, or one per domain (the domain must then be known at test time)."""

    state: State | None = None
    per_site: dict[str, State] | None = None
    rounds: int = 1
    bytes_sent: dict[str, int] = field(default_factory=dict)  # site -> bytes it sent, all rounds
    site_seconds: float = 0.0  # site-side compute on the critical path (the slowest site), all rounds
    notes: str = ""
    bank: BNBank | None = None  # per-site BN statistics the model picks from, image by image


STRATEGIES = Registry("strategy")


@dataclass(frozen=True)
class StrategyOptions:
    """What every strategy declares besides its options: what it needs, and whether the domain must be known."""

    needs: ClassVar[str] = ""  # what it needs beyond one update per site
    test_time_domain: ClassVar[bool] = False  # one model per domain: the domain must be known at test time


def make_options(strategy: Entry, options: Mapping[str, Any]) -> Any:
    """The strategy's typed options from kebab- or snake-case keys; unknown keys and wrong types are errors."""
    return strategy.make_options(options, {"lambda": "lam"})


def get_strategy(name: str) -> tuple[Entry, dict[str, Any]]:
    """The registered strategy for ``name``; ``single:<site>`` also returns ``{"site": <site>}``."""
    head, sep, arg = name.partition(":")
    strategy = STRATEGIES.get(head)
    if head == "single":
        if not sep or not arg:
            raise ValueError("strategy 'single' needs a site: single:<site>")
        return strategy, {"site": arg}
    if sep:
        raise ValueError(f"strategy {head!r} takes no ':' argument")
    return strategy, {}


def _one_shot(
    inputs: MergeInputs, state: State | None, notes: str = "", per_site: dict[str, State] | None = None
) -> Outcome:
    """One round: every site sent its update once."""
    return Outcome(
        state=state,
        per_site=per_site,
        rounds=1,
        bytes_sent=dict(inputs.update_bytes),
        site_seconds=max(inputs.adapt_seconds.values()),
        notes=notes,
    )


def _services(inputs: MergeInputs, strategy: str) -> SiteServices:
    if inputs.sites is None:
        raise ValueError(f"strategy {strategy!r} needs the sites again; no SiteServices were given")
    return inputs.sites


def _image_weight(weight: float | None) -> float:
    """A row's image weight, checked; unset, a real run's (``bn-image-weight``), as the ServerApp would use."""
    if weight is None:
        return RunConfig.defaults().bn_image_weight
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"image-weight must be in [0, 1] (0: off, 1: each image's own statistics), not {weight}")
    return weight


@dataclass(frozen=True)
class SourceOnlyOptions(StrategyOptions):
    needs: ClassVar[str] = "nothing"
    image_weight: float = 0.0  # each test image's share of its own BN statistics (the start: none unless asked)

    def __post_init__(self) -> None:
        _image_weight(self.image_weight)


@dataclass(frozen=True)
class SingleOptions(StrategyOptions):
    needs: ClassVar[str] = "one site's update"
    site: str
    image_weight: float = 0.0  # each test image's share of its own BN statistics (a site alone: none unless asked)

    def __post_init__(self) -> None:
        _image_weight(self.image_weight)


def _method_row(method: str) -> type:
    """A merge method's row options: the method's own options, from its registry entry, the BN rule, the method.

    The toolkits average BN statistics like weights, so ``buffers`` defaults to ``average``.
    """
    entry = MERGE_METHODS.get(method)
    own = [f.name for f in dataclasses.fields(entry.options)]

    def check(self: Any) -> None:  # the method's options and the BN rule, checked when the config is read
        merge_spec(method, {name: getattr(self, name) for name in own}, buffers=self.buffers)

    namespace = {
        "method": method,
        "needs": "the shared start" if entry.options.needs_base else "",
        "__post_init__": check,
        "method_options": lambda self: {name: getattr(self, name) for name in own},
    }
    return dataclasses.make_dataclass(
        f"{entry.options.__name__}Row",
        [("buffers", str, field(default="average"))],
        bases=(entry.options, StrategyOptions),
        frozen=True,
        namespace=namespace,
    )


@dataclass(frozen=True)
class MergeOptions(StrategyOptions):
    """Any registered merge method; a field left unset takes the run config's default."""

    method: str = "linear"
    options: str = ""  # the method's own options, as in the run config: "k=0.2 lam=1.0"
    buffers: str | None = None
    weighting: str | None = None
    equal_site_stats: bool | None = None
    max_share: float | None = None
    clip_norm: float | None = None
    bank: bool = False  # ship every site's own BN statistics; each test image picks the closest
    image_weight: float | None = None  # each test image's share of its own BN statistics (unset: bn-image-weight's)

    def __post_init__(self) -> None:
        _image_weight(self.image_weight)
        self.spec()

    def spec(self) -> MergeSpec:
        skip = ("method", "options", "bank", "image_weight")
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        changes = {k: v for k, v in changes.items() if v is not None}
        changes.setdefault("max_share", RunConfig.defaults().max_site_share)  # a real run's default
        return merge_spec(self.method, parse_key_values(self.options, "merge options"), **changes)


@dataclass(frozen=True)
class RecalibrateOptions(StrategyOptions):
    needs: ClassVar[str] = "a second round: BN sums under the merged parameters"
    mode: str = "batch"  # how the sites' statistics pass normalises (BNStatsConfig.mode)
    equal_sites: bool = False  # pool the sites' statistics with equal weights instead of by their counts
    bank: bool = False  # ship each site's statistics under the merged parameters; each test image picks one
    image_weight: float | None = None  # each test image's share of its own BN statistics (unset: bn-image-weight's)

    def __post_init__(self) -> None:
        if self.mode not in ("batch", "eval"):
            raise ValueError(f"recalibrate: mode must be batch or eval, not {self.mode!r}")
        _image_weight(self.image_weight)


@dataclass(frozen=True)
class LocalBNOptions(StrategyOptions):
    test_time_domain: ClassVar[bool] = True


@dataclass(frozen=True)
class SeparateHeadsOptions(StrategyOptions):
    test_time_domain: ClassVar[bool] = True
    head_prefix: str = "classifier."


@dataclass(frozen=True)
class LayerwiseSelectOptions(StrategyOptions):
    """Layer-wise merges anchored on each site in turn, and the plain merge; the sites' label-free scores choose."""

    needs: ClassVar[str] = "a selection round: every site scores each candidate (scalars back)"
    score: str = "confident"  # the label-free score whose worst-site value picks the candidate
    start: float = 0.5
    strength: float = 1.0
    bank: bool = False
    image_weight: float | None = None  # unset: bn-image-weight's

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"layerwise-select: score must be one of {', '.join(SCORES)}, not {self.score!r}")
        _image_weight(self.image_weight)
        method_options("layerwise", {"anchor": "any", "start": self.start, "strength": self.strength})


@dataclass(frozen=True)
class DataCombinationOptions(StrategyOptions):
    needs: ClassVar[str] = "all targets' images in one place (not private)"
    image_weight: float = 0.0  # each test image's share of its own BN statistics (none unless asked)

    def __post_init__(self) -> None:
        _image_weight(self.image_weight)


@dataclass(frozen=True)
class FedAvgOptions(StrategyOptions):
    needs: ClassVar[str] = "R training rounds"
    rounds: int = 3
    split_steps: bool = True  # divide the method's ``steps`` over the rounds: same local compute in all
    buffers: str = "gaussian"  # how the server pools BN statistics each round

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"fedavg-rounds: rounds must be at least 1, not {self.rounds}")
        merge_spec(buffers=self.buffers)


@STRATEGIES.implements("source-only", options=SourceOnlyOptions, summary="the shared start, unadapted")
def _source_only(inputs: MergeInputs, options: SourceOnlyOptions) -> Outcome:
    return _own_statistics(Outcome(state=dict(inputs.base), rounds=0), "source", options.image_weight)


def _own_statistics(outcome: Outcome, name: str, image_weight: float) -> Outcome:
    """One model normalising each test image with its own statistics mixed in, as a shipped merge does."""
    if image_weight > 0:
        _, buffers = split_state(outcome.state)
        outcome.bank = BNBank.single(name, buffers, image_weight)
        note = f"each test image's own BN statistics mixed in at {image_weight:g}"
        outcome.notes = f"{outcome.notes}; {note}" if outcome.notes else note
    return outcome


@STRATEGIES.implements("single", options=SingleOptions, summary="one site's adapted model, used everywhere")
def _single(inputs: MergeInputs, options: SingleOptions) -> Outcome:
    update = inputs.update(options.site)
    outcome = Outcome(
        state=update.state_dict(),
        rounds=1,
        bytes_sent={options.site: inputs.update_bytes[options.site]},
        site_seconds=inputs.adapt_seconds[options.site],
    )
    return _own_statistics(outcome, options.site, options.image_weight)


@STRATEGIES.implements(
    "average", options=StrategyOptions, summary="every tensor averaged like weights (FedAvg, merging toolkits)"
)
def _average(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, average_all(inputs.base, inputs.updates))


@STRATEGIES.implements(
    "params-only", options=StrategyOptions, summary="parameters averaged, site 1's BN statistics kept"
)
def _params_only(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, params_only(inputs.base, inputs.updates), f"BN statistics of {inputs.updates[0].site}")


@STRATEGIES.implements(
    "reference",
    options=StrategyOptions,
    summary="published rule: BN pooled with n = num_batches_tracked on EMA statistics",
)
def _reference(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, reference(inputs.base, inputs.ema_updates), "EMA statistics, n = num_batches_tracked")


@STRATEGIES.implements("gaussian", options=StrategyOptions, summary="ours: exact statistics pooled by sample counts")
def _gaussian(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, gaussian(inputs.base, inputs.updates))


@STRATEGIES.implements(
    "gaussian-equal", options=StrategyOptions, summary="exact statistics pooled, every site weighted equally"
)
def _gaussian_equal(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, gaussian(inputs.base, inputs.updates, equal_sites=True))


@STRATEGIES.implements(
    "weighted", options=StrategyOptions, summary="parameters weighted by image counts; statistics pooled by counts"
)
def _weighted(inputs: MergeInputs, options: StrategyOptions) -> Outcome:
    return _one_shot(inputs, gaussian(inputs.base, inputs.updates, weighting="counts"))


def _method_row_strategy(inputs: MergeInputs, options: Any) -> Outcome:
    """A merge method's row: the method its options name, with the row's BN rule."""
    own = options.method_options()
    state = merge(inputs.base, inputs.updates, merge_spec(options.method, own, buffers=options.buffers))
    described = ", ".join(f"{'λ' if k == 'lam' else k}={v:g}" for k, v in own.items())
    return _one_shot(inputs, state, f"{described}, BN {options.buffers}".lstrip(", "))


@STRATEGIES.implements(
    "merge", options=MergeOptions, summary="any registered merge method, as `fedmerge merge --method` runs it"
)
def _merge(inputs: MergeInputs, options: MergeOptions) -> Outcome:
    spec = options.spec()
    engine = _ingested(spec, inputs.base, inputs.ema_updates if spec.buffers == "reference" else inputs.updates)
    notes = f"{spec.method} {spec.options}, BN {spec.buffers}, weights {spec.weighting}"
    outcome = _one_shot(inputs, engine.result(), notes)
    _ship_bank(outcome, engine, "own" if options.bank else "", _image_weight(options.image_weight))
    return outcome


def _ship_bank(outcome: Outcome, engine: MergeEngine, bn_bank: str, image_weight: float) -> None:
    """The bank the run config's ``bn-bank`` and ``bn-image-weight`` ship (``common.config.run.bank_source``)."""
    source = bank_source(bn_bank, image_weight)
    if not source:
        return
    outcome.bank = engine.bank(source, image_weight)
    statistics = f"the sites' {source}" if bn_bank else "the merge's own"
    outcome.notes += f", BN bank of {statistics} statistics"
    if image_weight > 0:
        outcome.notes += f", each test image's own mixed in at {image_weight:g}"


@STRATEGIES.implements("layerwise-select", options=LayerwiseSelectOptions,
                       summary="layer-wise merges by anchor site; the worst site's label-free score picks")  # fmt: skip
def _layerwise(inputs: MergeInputs, options: LayerwiseSelectOptions) -> Outcome:
    services = _services(inputs, "layerwise-select")
    default = MergeOptions().spec()  # every candidate takes a real run's defaults, as a selection round's do
    candidates = {"default": default} | {
        f"anchor={u.site}": dataclasses.replace(default, method="layerwise", options=method_options(
            "layerwise", {"anchor": u.site, "start": options.start, "strength": options.strength}))
        for u in inputs.updates
    }  # fmt: skip
    outcomes: dict[str, Outcome] = {}
    worst: dict[str, float] = {}
    for label, spec in candidates.items():
        engine = _ingested(spec, inputs.base, inputs.updates)
        outcomes[label] = _one_shot(inputs, engine.result())
        _ship_bank(outcomes[label], engine, "own" if options.bank else "", _image_weight(options.image_weight))
        worst[label] = min(services.label_free(engine.result(), outcomes[label].bank)[options.score].values())
    chosen = max(worst, key=lambda label: worst[label])  # the first of equals: the default before any anchor
    shown = ", ".join(f"{label} {value:.4f}" for label, value in worst.items())
    outcome = outcomes[chosen]
    outcome.notes = f"chose {chosen} by the worst site's {options.score} ({shown})" + outcome.notes
    return outcome


@STRATEGIES.implements("fedbn", options=LocalBNOptions, summary="BN layers stay local; the rest averaged")
def _fedbn(inputs: MergeInputs, options: LocalBNOptions) -> Outcome:
    return _one_shot(inputs, None, per_site=fedbn(inputs.base, inputs.updates))


@STRATEGIES.implements("separate-heads", options=SeparateHeadsOptions, summary="backbone merged, heads per domain")
def _separate_heads(inputs: MergeInputs, options: SeparateHeadsOptions) -> Outcome:
    return _one_shot(inputs, None, per_site=separate_heads(inputs.base, inputs.updates, options.head_prefix))


@STRATEGIES.implements(
    "recalibrate",
    options=RecalibrateOptions,
    summary="merged parameters go back; sites return Σx, Σx², n per BN channel; the server pools them",
)
def _recalibrate(inputs: MergeInputs, options: RecalibrateOptions) -> Outcome:
    services = _services(inputs, "recalibrate")
    spec = merge_spec(buffers="gaussian", equal_site_stats=options.equal_sites)
    engine = _ingested(spec, inputs.base, inputs.updates)
    merged = engine.result()
    outcome = _one_shot(inputs, merged)
    second_round = 0.0
    for update in inputs.updates:
        sums, nbytes, seconds = services.bn_sums(update.site, merged, options.mode)
        _accept(engine.pool_sums(update.site, sums))
        outcome.bytes_sent[update.site] += nbytes
        second_round = max(second_round, seconds)
    engine.apply_recalibration()
    outcome.state = engine.result()
    outcome.rounds, outcome.site_seconds = 2, outcome.site_seconds + second_round
    weights = "equal site weights" if options.equal_sites else "pooled by counts"
    outcome.notes = f"second round: {options.mode}-mode BN sums, {weights}"
    _ship_bank(outcome, engine, "recalibrated" if options.bank else "", _image_weight(options.image_weight))
    return outcome


def _ingested(spec: MergeSpec, base: Mapping[str, Tensor], updates: Sequence[SiteUpdate]) -> MergeEngine:
    """An engine with every update folded in, the claims declared first when a cap on the shares needs them."""
    engine = MergeEngine(spec, base)
    if spec.weighting != "uniform" and spec.max_share < 1.0:
        engine.expect_weights([float(u.num_examples) for u in updates])
    for update in updates:
        _accept(engine.ingest(update))
    return engine


def _accept(outcome: object) -> None:
    if isinstance(outcome, Refused):
        raise ValueError(outcome.reason)


@STRATEGIES.implements(
    "data-combination", options=DataCombinationOptions, summary="one model adapted on every target's images together"
)
def _data_combination(inputs: MergeInputs, options: DataCombinationOptions) -> Outcome:
    update, image_bytes, seconds = _services(inputs, "data-combination").combined()
    outcome = Outcome(
        state=update.state_dict(),
        rounds=0,
        bytes_sent=image_bytes,
        site_seconds=seconds,
        notes="bytes: the sites' images (uint8 RGB)",
    )
    return _own_statistics(outcome, "combined", options.image_weight)


@STRATEGIES.implements("fedavg-rounds", options=FedAvgOptions, summary="Flower FedAvg over R rounds, same method")
def _fedavg_rounds(inputs: MergeInputs, options: FedAvgOptions) -> Outcome:
    return _services(inputs, "fedavg-rounds").fedavg(options.rounds, options.split_steps, options.buffers)


for _method in MERGE_METHODS:  # every merge method is a row of its own, with its registry options
    STRATEGIES.add(
        _method,
        target="experiments.strategies:_method_row_strategy",
        options=_method_row(_method),
        summary=MERGE_METHODS.get(_method).summary,
    )
