"""The server operator's typed configuration, taken from the one run-config reader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config.run import ConfigError, MergeCandidate, RunConfig, bank_source
from common.data import DataSpec
from common.merge.spec import MergeSpec

__all__ = ["MergeConfig", "ServerConfig"]


@dataclass(frozen=True)
class MergeConfig:
    """How the merge round runs: the spec of the merge, and when to stop waiting."""

    spec: MergeSpec
    min_sites: int
    timeout: float
    recalibrate: bool
    recalibrate_mode: str
    poll_interval: float = 0.05  # seconds between pulls while replies are outstanding
    secure: bool = False  # secure aggregation: the server learns only sums (server/rounds/secure.py)
    bn_bank: str = ""  # ship the sites' own or recalibrated BN statistics with the merge
    bn_image_weight: float = 0.0  # each test image's share of its own BN statistics (0: off; a run's default 0.1)
    candidates: tuple[MergeCandidate, ...] = ()  # a label-free selection among these (server/rounds/select.py)
    select_score: str = "confident"
    select_aggregate: str = "worst"

    @classmethod
    def from_run(cls, run: RunConfig) -> MergeConfig:
        candidates = tuple(run.candidates()) if run.select else ()
        return cls(run.merge_spec(), run.min_sites, run.timeout, run.recalibrate, run.recalibrate_mode,
                   secure=run.secure_aggregation, bn_bank=run.bn_bank, bn_image_weight=run.bn_image_weight,
                   candidates=candidates,
                   select_score=run.select_score, select_aggregate=run.select_aggregate)  # fmt: skip

    @property
    def bank_source(self) -> str:
        return bank_source(self.bn_bank, self.bn_image_weight)

    def summary(self) -> list[str]:
        """The merge in the shape of Flower's own strategy summaries: one setting per line, the rounds last."""
        spec = self.spec
        options = " ".join(f"{k}={v}" for k, v in vars(spec.options).items())
        then = [f"label-free selection among {len(self.candidates)} candidates "
                f"({self.select_aggregate} {self.select_score})"] if self.candidates else []  # fmt: skip
        then += [f"recalibration round ({self.recalibrate_mode})"] if self.recalibrate else []
        return [
            f"method: {spec.method}" + (f" ({options})" if options else ""),
            f"site weights: {spec.weighting}, at most {spec.max_share:g} each",
            f"BN statistics: {spec.buffers}"
            + (", sites weighted equally" if spec.equal_site_stats else "")
            + (f", with a bank of the sites' {self.bn_bank} statistics" if self.bn_bank else "")
            + (f", each test image's own mixed in at {self.bn_image_weight:g}" if self.bn_image_weight else ""),
            f"sums: {spec.precision}"
            + (", secure aggregation (the server sees only sums)" if self.secure else "")
            + (f"; clip-norm {spec.clip_norm:g}" if spec.clip_norm else ""),
            f"at least {self.min_sites} sites, waiting up to {self.timeout:g} s",
            "then: " + (", ".join(then) or "nothing"),
        ]


@dataclass(frozen=True)
class ServerConfig:
    run: RunConfig
    out_dir: Path
    merge: MergeConfig
    eval_specs: dict[str, DataSpec]

    @classmethod
    def from_run(cls, run: RunConfig, run_id: int | None = None) -> ServerConfig:
        """``out-dir`` as given (it must be absolute), or, left empty, ``runs/flwr-run-<id>`` under the working
        directory: ``flwr run .`` with the declared defaults then writes beside the project it ran."""
        out_dir = Path(run.out_dir)
        if not run.out_dir and run_id is not None:
            out_dir = (Path.cwd() / "runs" / f"flwr-run-{run_id}").resolve()
        elif not run.out_dir or not out_dir.is_absolute():
            raise ConfigError(
                f"run config 'out-dir' must be an absolute path (the ServerApp runs in the SuperLink's "
                f"directory), got {run.out_dir!r}"
            )
        return cls(run, out_dir, MergeConfig.from_run(run), run.eval_specs())

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.run.arch,
            "num_classes": self.run.num_classes,
            "initial_weights": self.run.initial_weights,
            "send_initial_weights": self.run.send_initial_weights,
            "merge": self.merge.spec.describe(),
            "min_sites": self.merge.min_sites,
            "recalibrate": self.merge.recalibrate,
            "eval_domains": sorted(self.eval_specs),
        }
