"""The run configuration, read once into a typed value whose defaults live only in ``pyproject.toml``.

Flower reads ``[tool.flwr.app.config]`` to know which keys a run may set and fills in
their defaults; this module reads the same table, so a key has one default and one
type (that of its default) everywhere: in the ServerApp and ClientApp, in
``fedmerge simulate --set``, in presets and in experiments. Every value is checked
before anything starts (an unknown key is refused with the closest known one, a
boolean must be a boolean or exactly ``true``/``false``), and the whole check imports
neither torch nor Flower, so it answers at once.

Each process builds one :class:`RunConfig` (one per site in simulation) and passes it
down. Data is named by data specs, one key per role (``site-data``, ``source-data``,
``eval-data``), in the grammar of ``common.data.spec``. A wheel carries the project's
``pyproject.toml`` inside the package (``setup.py`` copies it at build time), so an
installed copy has its defaults, and is a whole Flower app, wherever it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.spec import DOMAIN_FIELD, DataSpec, NamedSpec, parse_spec_list
from common.device.spec import DeviceError, check_amp, check_device, check_num_gpus
from common.merge.spec import MergeSpec, method_options
from common.models.catalog import check_arch
from common.options.typed import OptionError, closest, coerce, parse_key_values
from common.scoring.scores import SCORES

__all__ = ["REPLACED_KEYS", "ConfigError", "MergeCandidate", "RunConfig", "app_pyproject", "bank_source",
           "check_values", "declared_defaults"]  # fmt: skip

PROJECT_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # a checkout's, or Flower's app copy's
PACKAGED_PYPROJECT = Path(__file__).resolve().with_name("app-pyproject.toml")  # the copy a wheel carries
# Keys of earlier releases, each refused with the key that replaced it (kept for one release, then dropped).
REPLACED_KEYS = {
    **dict.fromkeys(("dataset", "data-root", "domains", "split", "time-split", "size", "num-images"), "site-data"),
    **dict.fromkeys(("source-dataset", "source-data-root", "source-split", "source-domain", "source-size",
                     "source-num-images"), "source-data"),
    **dict.fromkeys(("eval-dataset", "eval-data-root", "eval-domains", "eval-split", "eval-time-split", "eval-size",
                     "eval-num-images", "eval-seed"), "eval-data"),
}  # fmt: skip
_SPEC_EXAMPLES = {
    "site-data": 'site-data = "synthetic?domain=fog&n=32;synthetic?domain=night&n=32" (one spec per site)',
    "source-data": 'source-data = "camvid:DIR?split=all&domain=0016E5"',
    "eval-data": 'eval-data = "fog=synthetic?domain=fog&n=24&seed=2;night=synthetic?domain=night&n=24&seed=2"',
}
STRATEGIES = ("one-shot", "fedavg")
RECALIBRATE_MODES = ("batch", "eval")
BN_BANKS = ("", "own", "recalibrated")
GUARD_RULES = ("fallback", "interpolate")  # clients/guard.py


class ConfigError(OptionError):
    """A run configuration that cannot run: named key, what is wrong, what would be right."""


@dataclass(frozen=True)
class MergeCandidate:
    """One merge a label-free selection may choose: its label (the run-config changes), spec and BN bank."""

    label: str
    spec: MergeSpec
    bn_bank: str
    image_weight: float = 0.0  # each test image's share of its own BN statistics (bn-image-weight)

    @property
    def bank_source(self) -> str:
        return bank_source(self.bn_bank, self.image_weight)


def bank_source(bn_bank: str, image_weight: float) -> str:
    """Which statistics ship as a bank: the asked-for bank, else the merge's own when images mix theirs in."""
    return bn_bank or ("merged" if image_weight > 0 else "")


CANDIDATE_KEYS = {"merge-method", "merge-options", "param-weighting", "buffer-mode", "equal-site-stats",
                  "max-site-share", "bn-bank", "bn-image-weight"}  # fmt: skip


def app_pyproject() -> Path:
    """The Flower app's ``pyproject.toml``: the copy an installed wheel carries, else the project's own.

    The packaged copy exists only in a built install, so it wins there even if another
    package left a ``pyproject.toml`` in site-packages.
    """
    return PACKAGED_PYPROJECT if PACKAGED_PYPROJECT.is_file() else PROJECT_PYPROJECT


@functools.cache
def declared_defaults() -> dict[str, bool | int | float | str]:
    """``[tool.flwr.app.config]``: every run-config key with its default."""
    path = app_pyproject()
    try:
        table = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the run-config declarations in {path}: {exc}") from None
    return dict(table)


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, typed; build it with :meth:`read` (or ``dataclasses.replace`` on one)."""

    # the model every site starts from
    arch: str
    num_classes: int
    initial_weights: str
    send_initial_weights: bool
    # the data of each role, as data specs
    site_data: str
    source_data: str
    eval_data: str
    seed: int
    # local adaptation
    method: str
    method_options: str
    batch_size: int
    backbone_weights: str
    checkpoint_dir: str
    progress: bool
    guard: bool
    guard_score: str
    guard_margin: float
    guard_rule: str
    guard_max_change: float
    # where each site computes (common.device)
    device: str
    amp: str
    num_gpus: float
    # the merge
    min_sites: int
    timeout: float
    out_dir: str
    merge_method: str
    merge_options: str
    param_weighting: str
    buffer_mode: str
    equal_site_stats: bool
    max_site_share: float
    clip_norm: float
    recalibrate: bool
    recalibrate_mode: str
    bn_bank: str
    bn_image_weight: float
    secure_aggregation: bool
    select: str
    select_score: str
    select_aggregate: str
    select_candidates: str
    param_precision: str
    save_updates: bool
    profile: bool
    strategy: str
    num_rounds: int
    # optional server-side evaluation (the sets are eval-data)
    eval_sites: bool

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        _at_least(self.num_classes, 1, "num-classes")
        _at_least(self.batch_size, 1, "batch-size")
        _at_least(self.min_sites, 1, "min-sites")
        _at_least(self.num_rounds, 1, "num-rounds")
        self._check_data()
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, not {self.timeout}")
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.param_weighting, ("uniform", "counts"), "param-weighting")  # no per-site weights in a run
        _one_of(self.recalibrate_mode, RECALIBRATE_MODES, "recalibrate-mode")
        _one_of(self.bn_bank, BN_BANKS, "bn-bank")
        if self.bn_bank == "recalibrated" and not self.recalibrate:
            raise ConfigError("bn-bank = recalibrated needs recalibrate = true (the second round measures them)")
        _image_weight(self.bn_image_weight)
        if self.secure_aggregation:
            self._check_secure()
        for name in self.guard_score.split(","):
            _one_of(name.strip(), SCORES.names(), "guard-score")
        if not self.guard_margin >= 0:
            raise ConfigError(f"guard-margin must be >= 0, not {self.guard_margin}")
        _check_compute(self)
        _one_of(self.guard_rule, GUARD_RULES, "guard-rule")
        if not 0.0 < self.guard_max_change <= 1.0:
            raise ConfigError(f"guard-max-change must be in (0, 1] (1: off), not {self.guard_max_change}")
        _one_of(self.select, ("", "label-free"), "select")
        if self.select:
            if self.secure_aggregation:
                raise ConfigError("select = label-free scores one site's own model: not with secure-aggregation")
            self.candidates()  # every candidate checked now
        self.merge_spec()  # every merge key checked now, not when the first reply arrives

    def _check_data(self) -> None:
        """Every data spec of every role parses now, not when a site first reads it."""
        self.site_list()
        self.source_spec()
        self.eval_specs()

    def site_list(self) -> list[NamedSpec]:
        """``site-data`` as a list (one item per simulated partition); a ``{domain}`` template is one item."""
        items = _specs(self.site_data.replace(DOMAIN_FIELD, "domain"), "site-data")
        if not items:
            raise ConfigError(f"site-data names no data; e.g. {_SPEC_EXAMPLES['site-data']}")
        if DOMAIN_FIELD in self.site_data and len(items) > 1:
            raise ConfigError("site-data: a {domain} template is one spec, filled by each site; not a list")
        return items

    def source_spec(self) -> DataSpec | None:
        """The labeled source set (HRDA's), or None."""
        items = _specs(self.source_data, "source-data")
        if len(items) > 1:
            raise ConfigError(f"source-data is one spec, not {len(items)}")
        return items[0].spec if items else None

    def eval_specs(self) -> dict[str, DataSpec]:
        """The server's labeled evaluation sets by name (empty: no evaluation)."""
        return {item.name: item.spec for item in _specs(self.eval_data, "eval-data")}

    def _check_secure(self) -> None:
        """Secure aggregation sums; what needs one site's values cannot run under it."""
        if self.merge_method not in ("linear", "task-arithmetic"):
            raise ConfigError(f"secure-aggregation merges linearly; merge-method {self.merge_method!r} is not a sum")
        if self.buffer_mode != "gaussian":
            raise ConfigError(f"secure-aggregation pools BN statistics as Gaussians, not {self.buffer_mode!r}")
        if self.bn_bank:
            raise ConfigError("bn-bank ships each site's statistics: it cannot be combined with secure-aggregation")
        if self.clip_norm > 0 or self.strategy != "one-shot":
            raise ConfigError("secure-aggregation runs the one-shot merge, without clip-norm (no update is seen)")

    @classmethod
    def read(cls, values: Mapping[str, Any] | None = None) -> RunConfig:
        """The declared defaults overridden by ``values`` (kebab-case keys), every value checked."""
        merged = {**declared_defaults(), **dict(values or {})}
        return cls(**{k.replace("-", "_"): v for k, v in check_values(merged).items()})

    @classmethod
    @functools.cache
    def defaults(cls) -> RunConfig:
        """The declared defaults, built once per process (the value is immutable)."""
        return cls.read()

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Kebab-case keys and plain values, as ``flwr run --run-config`` takes them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def candidates(self) -> list[MergeCandidate]:
        """The candidate merges of a label-free selection: this run's merge changed by each item."""
        _one_of(self.select_aggregate, ("worst", "mean"), "select-aggregate")
        _one_of(self.select_score, SCORES.names(), "select-score")
        out = []
        for item in (part.strip() for part in self.select_candidates.split(";")):
            if not item:
                continue
            changes = {} if item == "default" else dict(kv.partition("=")[::2] for kv in item.split())
            unknown = set(changes) - CANDIDATE_KEYS
            if unknown:
                raise ConfigError(f"select-candidates item {item!r}: only {sorted(CANDIDATE_KEYS)} can change")
            values = {**self.to_flower(), **check_values(changes)}
            bank = str(values["bn-bank"])
            _one_of(bank, BN_BANKS, "bn-bank")
            out.append(MergeCandidate(item, _merge_spec(values), bank, _image_weight(values["bn-image-weight"])))
        if len(out) < 2:
            raise ConfigError(f"select-candidates needs at least two candidates, got {self.select_candidates!r}")
        return out

    def merge_spec(self) -> MergeSpec:
        """The merge this run asks for."""
        return _merge_spec(self.to_flower())


def _merge_spec(values: Mapping[str, Any]) -> MergeSpec:
    """The merge the run-config values ``values`` (kebab-case, typed) ask for."""
    method = str(values["merge-method"])
    options = method_options(method, parse_key_values(str(values["merge-options"]), "merge-options"))
    return MergeSpec(method, options, values["param-weighting"], values["buffer-mode"], values["equal-site-stats"],
                     values["param-precision"], values["max-site-share"], values["clip-norm"])  # fmt: skip


def _specs(text: str, key: str) -> list[NamedSpec]:
    try:
        return parse_spec_list(text, f"run config {key!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every key known and every value of its declared type, else one clear error."""
    declared = declared_defaults()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in REPLACED_KEYS and key not in declared:
            new = REPLACED_KEYS[key]
            raise ConfigError(f"run-config key {key!r} was replaced by {new!r}, a data spec: {_SPEC_EXAMPLES[new]}")
        if key not in declared:
            raise ConfigError(f"unknown run-config key {key!r}{closest(key, declared)}")
        try:
            out[key] = coerce(value, type(declared[key]), f"run-config key {key!r}")
        except OptionError as exc:
            raise ConfigError(str(exc)) from None
    return out


def _check_compute(run: RunConfig) -> None:
    """The device keys, spelled right (whether this machine has the device is asked where a site starts)."""
    try:
        check_device(run.device)
        check_amp(run.amp)
        check_num_gpus(run.num_gpus)
    except DeviceError as exc:
        raise ConfigError(str(exc)) from None


def _check_arch(arch: str) -> None:
    try:
        check_arch(arch)
    except OptionError as exc:
        raise ConfigError(f"arch: {exc}") from None


def _image_weight(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"bn-image-weight must be in [0, 1] (0: off, 1: each image's own statistics), not {value}")
    return float(value)


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, not {value}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}{closest(value, allowed)}")
