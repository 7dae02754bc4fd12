"""An experiment as one typed value, read from a TOML file.

A comparison is only fair if every strategy sees the same inputs, so everything that
shapes those inputs lives here and nowhere else: the source model, the sites and the
data each adapts on, the local method, the evaluation sets, the seed. Strategies only
add their own options. Data specs may name ``{data_root}``; the command line fills it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.adaptation import METHODS
from clients.guard import GUARD_KEYS, GuardConfig
from common.data import DataSpec
from common.device.spec import Compute
from common.options.typed import closest
from common.training.pretrain import PretrainPlan
from experiments.shipped import CONFIGS_DIR, list_configs, resolve_config_path
from experiments.strategies import get_strategy, make_options
from server.runtime import PROJECT_ROOT

__all__ = [
    "CONFIGS_DIR",
    "EvalSet",
    "ExperimentConfig",
    "LMCConfig",
    "LocalMethod",
    "PretrainPlan",
    "ProtocolConfig",
    "SiteSpec",
    "SourceModel",
    "StrategyEntry",
    "list_configs",
    "resolve_config_path",
]

DATA_ROOT = "{data_root}"


@dataclass(frozen=True)
class SourceModel:
    """Where the model every site starts from comes from: a checkpoint, else a pretraining plan."""

    checkpoint: str = ""
    pretrain: PretrainPlan | None = None
    wrap: str = ""  # "hrda": every site starts from the checkpoint wrapped as hrda_<arch> (multi-resolution)


@dataclass(frozen=True)
class SiteSpec:
    """One site: its name (the domain it reports) and the unlabeled images it adapts on."""

    name: str
    data: DataSpec


@dataclass(frozen=True)
class EvalSet:
    """A labeled evaluation set; ``site`` names whose local parts serve it (fedbn, separate heads)."""

    domain: str
    data: DataSpec
    site: str


@dataclass(frozen=True)
class LocalMethod:
    """The adaptation every site runs, with the same options everywhere."""

    name: str = "adabn"
    options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    source: DataSpec | None = None  # the labeled source set, for methods that need it (hrda)
    guard: GuardConfig = field(default_factory=GuardConfig.read)  # [method] keys guard, guard-score, guard-margin
    backbone_weights: str = ""  # ImageNet backbone weights for hrda's feature distance ([method] backbone-weights)

    def recipe(self) -> dict[str, str]:
        """Its part of a cache key beyond the method and options: nothing without backbone weights."""
        return {"backbone_weights": self.backbone_weights} if self.backbone_weights else {}


@dataclass(frozen=True)
class StrategyEntry:
    """One row of the comparison: a registered strategy, its options and the label it shows."""

    name: str
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LMCConfig:
    """The linear-mode-connectivity curve: the two sites and the number of points on the line."""

    sites: tuple[str, str]
    points: int = 11


@dataclass(frozen=True)
class ProtocolConfig:
    """Repeated runs over time folds of each target sequence and over seeds (``experiments.protocol``).

    ``folds = 0`` is for sets without a time order (the synthetic styles): every run keeps the
    config's own splits and only the seed changes.
    """

    folds: int = 3
    gap: int = 5  # frames skipped between a fold's adaptation frames and its evaluation window
    eval_fraction: float = 0.2  # each evaluation window, as a share of its sequence
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.folds < 0 or self.gap < 0 or not 0 < self.eval_fraction < 1 or not self.seeds:
            raise ValueError(f"protocol needs folds >= 0, gap >= 0, 0 < eval-fraction < 1 and seeds; got {self}")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    source: SourceModel
    sites: tuple[SiteSpec, ...]
    eval_sets: tuple[EvalSet, ...]
    method: LocalMethod
    strategies: tuple[StrategyEntry, ...]
    lmc: LMCConfig | None = None
    protocol: ProtocolConfig | None = None
    seed: int = 0
    eval_batch_size: int = 8
    description: str = ""
    compute: Compute = field(default_factory=Compute)  # top-level device and amp: where sites train, models are scored

    def __post_init__(self) -> None:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: two sites share a name ({names})")
        if not names:
            raise ValueError(f"experiment {self.name!r}: no sites")
        domains = [e.domain for e in self.eval_sets]
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"experiment {self.name!r}: evaluation domains must be unique and non-empty ({domains})")
        labels = [s.label for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"experiment {self.name!r}: two strategies share the label(s) {_dupes(labels)}")
        if self.lmc is not None and not set(self.lmc.sites) <= set(names):
            raise ValueError(f"experiment {self.name!r}: lmc sites {self.lmc.sites} are not all among {names}")

    def site(self, name: str) -> SiteSpec:
        found = next((s for s in self.sites if s.name == name), None)
        if found is None:
            raise KeyError(f"no site {name!r}")
        return found

    @classmethod
    def load(cls, path: Path, data_root: str | None = None) -> ExperimentConfig:
        """Read ``path``; ``data_root`` replaces ``{data_root}`` (else the file's ``data-root-default``)."""
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read experiment config ({exc})") from exc
        return cls.from_dict(raw, path.stem, data_root)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], name: str, data_root: str | None = None) -> ExperimentConfig:
        _check_keys(raw, _TOP_KEYS, name)
        root = _data_root(raw, data_root)
        seed = int(raw.get("seed", 0))
        site_tables = _tables(raw.get("sites", []), "sites", {"name", "data"}, {"name", "data"}, name)
        sites = tuple(SiteSpec(str(s["name"]), _spec(s["data"], root, name)) for s in site_tables)
        eval_tables = _tables(raw.get("eval", []), "eval", {"domain", "data", "site"}, {"domain", "data"}, name)
        eval_sets = tuple(
            EvalSet(str(e["domain"]), _spec(e["data"], root, name), str(e.get("site", e["domain"])))
            for e in eval_tables
        )
        lmc_raw = raw.get("lmc")
        lmc = None
        if lmc_raw is not None:
            _check_keys(lmc_raw, {"sites", "points"}, f"{name} [lmc]")
            pair = lmc_raw.get("sites") or [s.name for s in sites[:2]]
            if len(pair) != 2:
                raise ValueError(f"{name}: lmc.sites must name two sites, got {pair}")
            lmc = LMCConfig((str(pair[0]), str(pair[1])), int(lmc_raw.get("points", 11)))
        return cls(
            name=name,
            source=_source(raw.get("source", {}), root, name),
            sites=sites,
            eval_sets=eval_sets,
            method=_method(raw.get("method", {}), root, name),
            strategies=_strategies(raw.get("strategies", []), [s.name for s in sites]),
            lmc=lmc,
            protocol=_protocol(raw.get("protocol"), name),
            seed=seed,
            eval_batch_size=int(raw.get("eval-batch-size", 8)),
            description=str(raw.get("description", "")),
            compute=_compute(raw, name),
        )


_TOP_KEYS = {
    "description", "seed", "data-root-default", "eval-batch-size", "source", "method", "sites", "eval",
    "strategies", "lmc", "protocol", "device", "amp",
}  # fmt: skip


def _compute(raw: Mapping[str, Any], where: str) -> Compute:
    """The top-level ``device`` and ``amp`` (checked as written; whether this machine has the device, at run time)."""
    try:
        return Compute(str(raw.get("device", "cpu")), str(raw.get("amp", "off")))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _protocol(raw: Any, where: str) -> ProtocolConfig | None:
    if raw is None:
        return None
    _check_keys(raw, {"folds", "gap", "eval-fraction", "seeds"}, f"{where} [protocol]")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{where} [protocol]: seeds must be a list of integers, not {seeds!r}")
    return ProtocolConfig(int(raw.get("folds", 3)), int(raw.get("gap", 5)), float(raw.get("eval-fraction", 0.2)),
                          tuple(seeds))  # fmt: skip


def _tables(raw: Any, what: str, allowed: set[str], required: set[str], where: str) -> list[Mapping[str, Any]]:
    """``[[what]]`` as a list of tables with known keys, or one error naming the entry and the key."""
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise ValueError(f"{where}: {what} must be a list of tables ([[{what}]] entries), not {raw!r}")
    for i, table in enumerate(raw):
        _check_keys(table, allowed, f"{where} [[{what}]] #{i + 1}")
        missing = required - set(table)
        if missing:
            raise ValueError(f"{where} [[{what}]] #{i + 1}: missing {sorted(missing)}")
    return list(raw)


def _dupes(items: list[str]) -> list[str]:
    return sorted({x for x in items if items.count(x) > 1})


def _check_keys(raw: Any, allowed: set[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a table, not {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        hint = closest(unknown[0], allowed)
        raise ValueError(f"{where}: unknown keys {unknown}{hint}; allowed: {sorted(allowed)}")


def _data_root(raw: Mapping[str, Any], given: str | None) -> str | None:
    """The command line's root, else the config's default when it exists on this machine."""
    if given:
        return str(Path(given).expanduser().resolve())
    default = str(raw.get("data-root-default", ""))
    if default:
        path = (PROJECT_ROOT / default).resolve()
        if path.exists():
            return str(path)
    return None


def _spec(text: str, root: str | None, where: str) -> DataSpec:
    if DATA_ROOT in text:
        if root is None:
            raise ValueError(f"{where}: the data spec {text!r} needs a data root: pass --data-root PATH")
        text = text.replace(DATA_ROOT, root)
    return DataSpec.parse(text)


def _source(raw: Mapping[str, Any], root: str | None, where: str) -> SourceModel:
    _check_keys(raw, {"checkpoint", "pretrain", "wrap"}, f"{where} [source]")
    wrap = str(raw.get("wrap", ""))
    if wrap not in ("", "hrda"):
        raise ValueError(f"{where} [source]: wrap must be 'hrda' or absent, not {wrap!r}")
    checkpoint = _file(str(raw.get("checkpoint", "")), root, where, "the source checkpoint")
    pre = raw.get("pretrain")
    plan = None
    if pre is not None:
        plan = PretrainPlan.from_table(pre, lambda text: _spec(text, root, where), f"{where} [source.pretrain]")
    if not checkpoint and plan is None:
        raise ValueError(f"{where}: [source] needs a checkpoint or a [source.pretrain] plan")
    return SourceModel(checkpoint, plan, wrap)


def _file(path: str, root: str | None, where: str, what: str) -> str:
    """A file a config names: ``{data_root}`` filled in, a relative path taken from the project folder."""
    if path and DATA_ROOT in path:
        if root is None:
            raise ValueError(f"{where}: {what} {path!r} needs a data root: pass --data-root")
        path = path.replace(DATA_ROOT, root)
    if path and not Path(path).is_absolute():
        path = str((PROJECT_ROOT / path).resolve())
    return path


def _method(raw: Mapping[str, Any], root: str | None, where: str) -> LocalMethod:
    _check_keys(raw, {"name", "options", "batch-size", "source", "backbone-weights", *GUARD_KEYS}, f"{where} [method]")
    source = raw.get("source")
    METHODS.get(str(raw.get("name", "adabn"))).make_options(dict(raw.get("options", {})))  # fails now, not later
    return LocalMethod(
        name=str(raw.get("name", "adabn")),
        options=dict(raw.get("options", {})),
        batch_size=int(raw.get("batch-size", 8)),
        source=_spec(source, root, where) if source else None,
        guard=GuardConfig.read({k: v for k, v in raw.items() if k in GUARD_KEYS}),
        backbone_weights=_file(str(raw.get("backbone-weights", "")), root, where, "the backbone weights"),
    )


def _strategies(raw: list[Any], sites: list[str]) -> tuple[StrategyEntry, ...]:
    """Strings name a strategy with its default options; tables add options and a label.

    ``single`` expands to ``single:<site>`` for every site (``<label>:<site>`` when the table has a label).
    """
    out: list[StrategyEntry] = []
    if not isinstance(raw, list):
        raise ValueError(f"strategies must be a list, not {raw!r}")
    for item in raw:
        if isinstance(item, str):
            name, options, label = item, {}, item
        elif isinstance(item, Mapping) and "name" in item:
            options = {k: v for k, v in item.items() if k not in ("name", "label")}
            name = str(item["name"])
            label = str(item.get("label", name))
        else:
            raise ValueError(f"a strategy is a name or a table with a 'name', not {item!r}")
        if name == "single":
            out += [StrategyEntry(f"single:{s}", f"{label}:{s}", dict(options)) for s in sites]
        else:
            out.append(StrategyEntry(name, label, options))
    for entry in out:  # every name and option checked now, before any site trains
        strategy, implied = get_strategy(entry.name)
        make_options(strategy, {**implied, **entry.options})
    return tuple(out)
