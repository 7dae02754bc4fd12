"""``fedmerge simulate``: N sites in Flower's simulation engine, from a preset or a TOML file.

A plan is a typed view of one TOML file: the number of sites, the run config the
ServerApp and ClientApps read, and optionally how to pretrain the shared source model
first. The run itself goes through a real SuperLink and ``flwr run``.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from common.config.run import ConfigError, RunConfig, check_values
from common.data.spec import DOMAIN_FIELD, DataSpec
from common.device.spec import Compute, DeviceError
from server.runtime import simulation_env

if TYPE_CHECKING:
    from common.training.pretrain import PretrainPlan

__all__ = ["PRESETS_DIR", "SimulationPlan", "check_devices", "list_presets", "run_simulation", "starting_weights"]

log = logging.getLogger(__name__)
PRESETS_DIR = Path(__file__).parent / "presets"
SOURCE_CHECKPOINT = "source.safetensors"


class SimulationFailed(RuntimeError):
    """The Flower run did not produce a merged model; the message carries its last log lines."""


@dataclass(frozen=True)
class SimulationPlan:
    name: str
    num_sites: int
    run_config: dict[str, Any] = field(default_factory=dict)
    pretrain: PretrainPlan | None = None
    description: str = ""
    source: Path | None = None  # a shipped starting model, made once by the [pretrain] recipe

    @classmethod
    def load(cls, path: Path) -> SimulationPlan:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read simulation config ({exc})") from exc
        unknown = set(raw) - {"description", "num-sites", "run-config", "pretrain", "source"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        pre = raw.get("pretrain")
        pretrain = _pretrain_plan(pre, path) if pre else None
        source = (path.parent / str(raw["source"])).resolve() if "source" in raw else None
        run_config = dict(raw.get("run-config", {}))
        try:
            check_values(run_config)  # the file's own keys and types, named with the file
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls(path.stem, raw.get("num-sites", 3), run_config, pretrain, str(raw.get("description", "")), source)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """The run config of this plan with ``overrides``, checked against the sites it will have.

        The one :class:`RunConfig` of the process that drives a simulation.
        """
        if not isinstance(self.num_sites, int) or isinstance(self.num_sites, bool) or self.num_sites < 1:
            raise ConfigError(f"num-sites must be an integer of at least 1, not {self.num_sites!r}")
        run = RunConfig.read({**self.run_config, **(overrides or {})})
        if run.min_sites > self.num_sites:
            raise ConfigError(f"min-sites = {run.min_sites} is more than the {self.num_sites} simulated sites")
        items = run.site_list()
        if DOMAIN_FIELD not in run.site_data and len(items) < self.num_sites:
            raise ConfigError(f"site-data lists {len(items)} spec(s) for {self.num_sites} simulated sites: "
                              "one per site")  # fmt: skip
        return run

    @classmethod
    def preset(cls, name: str) -> SimulationPlan:
        path = PRESETS_DIR / f"{name}.toml"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
        return cls.load(path)


def _pretrain_plan(raw: dict[str, Any], path: Path) -> PretrainPlan:
    from common.training.pretrain import PretrainPlan

    return PretrainPlan.from_table(raw, DataSpec.parse, f"{path} [pretrain]")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def start_path(plan: SimulationPlan, out_dir: Path, pretrain: bool) -> Path:
    """Where the run's start is: the shipped model, or the one the plan's recipe trains in the output folder."""
    if plan.source is not None and not pretrain:
        if not plan.source.is_file():
            raise FileNotFoundError(f"plan {plan.name!r}: its starting model {plan.source} is missing; "
                                    "--pretrain makes one from the plan's [pretrain] recipe")  # fmt: skip
        return plan.source
    if plan.pretrain is None:
        raise ValueError(f"plan {plan.name!r} has no [pretrain] recipe to train a starting model with")
    return out_dir / SOURCE_CHECKPOINT


def starting_weights(plan: SimulationPlan, out_dir: Path, pretrain: bool) -> Path:
    """The shipped starting model, or one pretrained by the plan's recipe once per output folder."""
    from common.training.pretrain import pretrain_to_file

    path = start_path(plan, out_dir, pretrain)
    if path.exists():
        log.info("using the starting model %s", path)
    elif plan.pretrain is not None:
        pretrain_to_file(plan.pretrain, path)
    return path


def check_devices(run: RunConfig) -> None:
    """The GPUs the simulated sites will ask for, checked on this machine (where they all run) before anything starts.

    A run on the CPU is not asked about: it needs neither torch here nor a GPU anywhere.
    """
    if not (run.device.startswith("cuda") or run.num_gpus > 0):
        return
    import torch

    from common.device.runtime import resolve_compute

    if run.num_gpus > 0 and run.device == "cpu":
        raise DeviceError(f"num-gpus = {run.num_gpus} reserves GPUs for sites that compute on the CPU "
                          "(device = 'cpu'): set device = 'cuda' or 'auto', or num-gpus = 0")  # fmt: skip
    if run.num_gpus > 0 and run.device not in ("auto", "cuda", "cuda:0"):
        raise DeviceError(f"device = {run.device!r} with num-gpus = {run.num_gpus}: Ray shows each simulated site "
                          "only its own GPU, as cuda:0; use device = 'cuda' or 'auto'")  # fmt: skip
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if run.num_gpus > count:
        raise DeviceError(f"num-gpus = {run.num_gpus} asks Ray for more than the {count} CUDA device(s) torch sees "
                          "on this machine: no site could be placed")  # fmt: skip
    resolve_compute(Compute(run.device, run.amp))


def run_simulation(
    plan: SimulationPlan,
    out_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    echo: TextIO | None = None,
    pretrain: bool = False,
) -> dict[str, Any]:
    """Run the plan, its run config changed by ``overrides``; returns the report the ServerApp wrote.

    The sites start from the run's ``initial-weights``, else the plan's shipped model, else
    (or with ``pretrain``) one trained by the plan's [pretrain] recipe. Every value is checked
    before anything starts. Raises with Flower's log on failure. ``echo`` receives Flower's
    output line by line (e.g. ``sys.stderr``).
    """
    out_dir = out_dir.resolve()
    values = {**(overrides or {}), "out-dir": str(out_dir)}
    start = None
    given = {**plan.run_config, **values}.get("initial-weights")
    if (plan.pretrain is not None or plan.source is not None) and not given:
        start = start_path(plan, out_dir, pretrain)  # known before anything is trained: the run is checked first
        values["initial-weights"] = str(start)
        if plan.pretrain is not None:  # the recipe names the architecture its model has
            values["arch"] = plan.pretrain.arch
    run = plan.resolve(values)  # the one RunConfig of this process
    check_devices(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    if start is not None:
        starting_weights(plan, out_dir, pretrain)
    rounds = run.num_rounds + (1 if run.recalibrate else 0)
    timeout = run.timeout * (rounds + 1) + 120
    report_path = out_dir / "report.json"
    report_path.unlink(missing_ok=True)  # never mistake an earlier run's report for this one's
    clock = {"started-at": time.time()}
    with simulation_env(out_dir / ".flwr", plan.num_sites, run.num_gpus) as (env, connection):
        clock["superlink-ready-at"] = time.time()
        result = env.run_app(connection, run.to_flower(), timeout=timeout, echo=echo)
        clock["flwr-run-ended-at"] = time.time()
    clock["stopped-at"] = time.time()
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if report.get("status") == "ok":
        report["driver"] = clock  # when each step of the run happened, for benchmarks/sim_overhead.py
        return report
    if report:
        raise SimulationFailed(f"simulation ended with status {report.get('status')!r}: {report.get('error')}")
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    raise SimulationFailed(f"simulation failed (flwr run exit {result.returncode}); last lines:\n{tail}")
