"""The run configuration, read once into a typed value whose defaults live only in ``pyproject.toml``.

Flower reads ``[tool.flwr.app.config]`` to know which keys a run may set and fills in
their defaults; this module reads the same table, so a key has one default and one
type (that of its default) everywhere: in the ServerApp and ClientApp, in
``fedmerge simulate --set``, in presets and in experiments. Every value is checked
before anything starts (an unknown key is refused with the closest known one, a
boolean must be a boolean or exactly ``true``/``false``), and the whole check imports
neither torch nor Flower, so it answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.device.spec import DeviceError, check_amp, check_device, check_num_gpus
from common.merge.spec import MergeSpec, method_info, method_options
from common.options.typed import OptionError, closest, coerce, parse_key_values

__all__ = ["PYPROJECT", "ConfigError", "MergeCandidate", "RunConfig", "declared_defaults"]

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
STRATEGIES = ("one-shot", "fedavg")
RECALIBRATE_MODES = ("batch", "eval")
BN_BANKS = ("", "own", "recalibrated")


class ConfigError(OptionError):
    """A run configuration that cannot run: named key, what is wrong, what would be right."""


@dataclass(frozen=True)
class MergeCandidate:
    """One merge a label-free selection may choose: its label (the run-config changes), spec and BN bank."""

    label: str
    spec: MergeSpec
    bn_bank: str


CANDIDATE_KEYS = {"merge-method", "merge-options", "param-weighting", "buffer-mode", "equal-site-stats",
                  "max-site-share", "bn-bank"}  # fmt: skip
# The label-free scores (common.scoring.label_free), named here so a configuration is checked without torch.
SCORE_NAMES = ("agreement", "neg-entropy", "confident", "diversity", "mix", "photometric")


@functools.cache
def declared_defaults() -> dict[str, bool | int | float | str]:
    """``[tool.flwr.app.config]`` of the project: every run-config key with its default."""
    try:
        table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the run-config declarations in {PYPROJECT}: {exc}") from None
    return dict(table)


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, typed; build it with :meth:`read` (or ``dataclasses.replace`` on one)."""

    # the model every site starts from
    arch: str
    num_classes: int
    initial_weights: str
    send_initial_weights: bool
    # the sites' target data
    dataset: str
    data_root: str
    domains: str
    split: str
    time_split: str
    size: str
    num_images: int
    seed: int
    site_data: str
    # local adaptation
    method: str
    method_options: str
    batch_size: int
    source_dataset: str
    source_data_root: str
    source_split: str
    source_domain: str
    source_size: str
    source_num_images: int
    backbone_weights: str
    checkpoint_dir: str
    progress: bool
    guard: bool
    guard_score: str
    guard_margin: float
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
    # optional server-side evaluation
    eval_dataset: str
    eval_data_root: str
    eval_domains: str
    eval_split: str
    eval_time_split: str
    eval_size: str
    eval_num_images: int
    eval_seed: int
    eval_sites: bool

    def __post_init__(self) -> None:
        _at_least(self.num_classes, 1, "num-classes")
        _at_least(self.batch_size, 1, "batch-size")
        _at_least(self.min_sites, 1, "min-sites")
        _at_least(self.num_rounds, 1, "num-rounds")
        for key in ("num-images", "source-num-images", "eval-num-images"):
            _at_least(getattr(self, key.replace("-", "_")), 0, key)
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, not {self.timeout}")
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.param_weighting, ("uniform", "counts"), "param-weighting")  # no per-site weights in a run
        _one_of(self.recalibrate_mode, RECALIBRATE_MODES, "recalibrate-mode")
        _one_of(self.bn_bank, BN_BANKS, "bn-bank")
        if self.bn_bank == "recalibrated" and not self.recalibrate:
            raise ConfigError("bn-bank = recalibrated needs recalibrate = true (the second round measures them)")
        if self.secure_aggregation:
            self._check_secure()
        for name in self.guard_score.split(","):  # checked here without torch, and by clients.guard on the registry
            _one_of(name.strip(), SCORE_NAMES, "guard-score")
        if not self.guard_margin >= 0:
            raise ConfigError(f"guard-margin must be >= 0, not {self.guard_margin}")
        _check_compute(self)
        _one_of(self.select, ("", "label-free"), "select")
        if self.select:
            if self.secure_aggregation:
                raise ConfigError("select = label-free scores one site's own model: not with secure-aggregation")
            self.candidates()  # every candidate checked now
        self.merge_spec()  # every merge key checked now, not when the first reply arrives

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
    def defaults(cls) -> RunConfig:
        return cls.read()

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Kebab-case keys and plain values, as ``flwr run --run-config`` takes them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def candidates(self) -> list[MergeCandidate]:
        """The candidate merges of a label-free selection: this run's merge changed by each item."""
        _one_of(self.select_aggregate, ("worst", "mean"), "select-aggregate")
        if self.select_score not in SCORE_NAMES:
            raise ConfigError(f"select-score must be one of {', '.join(SCORE_NAMES)}, not {self.select_score!r}"
                              f"{closest(self.select_score, SCORE_NAMES)}")  # fmt: skip
        out = []
        for item in (part.strip() for part in self.select_candidates.split(";")):
            if not item:
                continue
            changes = {} if item == "default" else dict(kv.partition("=")[::2] for kv in item.split())
            unknown = set(changes) - CANDIDATE_KEYS
            if unknown:
                raise ConfigError(f"select-candidates item {item!r}: only {sorted(CANDIDATE_KEYS)} can change")
            run = RunConfig.read({**self.to_flower(), **changes, "select": ""})
            out.append(MergeCandidate(item, run.merge_spec(), run.bn_bank))
        if len(out) < 2:
            raise ConfigError(f"select-candidates needs at least two candidates, got {self.select_candidates!r}")
        return out

    def merge_spec(self) -> MergeSpec:
        """The merge this run asks for."""
        method_info(self.merge_method)
        raw = parse_key_values(self.merge_options, "merge-options")
        options = method_options(self.merge_method, raw)
        return MergeSpec(self.merge_method, options, self.param_weighting, self.buffer_mode, self.equal_site_stats,
                         self.param_precision, self.max_site_share, self.clip_norm)  # fmt: skip


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every key known and every value of its declared type, else one clear error."""
    declared = declared_defaults()
    out: dict[str, Any] = {}
    for key, value in values.items():
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


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, not {value}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}{closest(value, allowed)}")
