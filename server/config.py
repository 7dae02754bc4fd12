"""The server operator's typed configuration, read from Flower's run config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.data import DataSpec
from common.merging import BUFFER_MODES, PARAM_PRECISIONS

__all__ = ["MergeConfig", "ServerConfig"]


@dataclass(frozen=True)
class MergeConfig:
    """How the one-shot merge runs."""

    min_sites: int = 2
    timeout: float = 600.0
    param_weighting: str = "uniform"  # uniform | counts
    buffer_mode: str = "gaussian"  # gaussian | reference | average | first
    equal_site_stats: bool = False  # gaussian pooling with every site weighted equally
    recalibrate: bool = False  # second round: BN sums under the merged parameters
    recalibrate_mode: str = "batch"
    # float64: exact sums, bit-identical in any arrival order, 2 models of memory;
    # float32: 1 model and about half the time, last bits depend on the order
    param_precision: str = "float64"
    poll_interval: float = 0.2

    def __post_init__(self) -> None:
        if self.min_sites < 1:
            raise ValueError(f"min-sites must be at least 1, got {self.min_sites}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.param_weighting not in ("uniform", "counts"):
            raise ValueError(f"param-weighting must be uniform or counts, not {self.param_weighting!r}")
        if self.buffer_mode not in BUFFER_MODES:
            raise ValueError(f"buffer-mode must be one of {', '.join(BUFFER_MODES)}, not {self.buffer_mode!r}")
        if self.param_precision not in PARAM_PRECISIONS:
            raise ValueError(f"param-precision must be float64 or float32, not {self.param_precision!r}")

    @property
    def param_dtype(self) -> torch.dtype:
        return PARAM_PRECISIONS[self.param_precision]


def _eval_specs(config: Mapping[str, Any]) -> dict[str, DataSpec]:
    domains = [d.strip() for d in str(config.get("eval-domains", "")).split(",") if d.strip()]
    if not str(config.get("eval-dataset", "")) or not domains:
        return {}
    return {d: DataSpec.from_config({**config, "eval-domain": d}, prefix="eval-") for d in domains}


@dataclass(frozen=True)
class ServerConfig:
    arch: str
    num_classes: int
    initial_weights: str
    out_dir: Path
    merge: MergeConfig
    eval_specs: dict[str, DataSpec]
    save_updates: bool = False
    eval_sites: bool = False
    send_initial_weights: bool = True  # false: sites load their local copy, checked by fingerprint
    batch_size: int = 8
    seed: int = 0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerConfig:
        out_dir = Path(str(config.get("out-dir", "")))
        if not str(config.get("out-dir", "")) or not out_dir.is_absolute():
            raise ValueError(
                f"run config 'out-dir' must be an absolute path (the ServerApp runs in the SuperLink's "
                f"directory), got {str(config.get('out-dir', ''))!r}"
            )
        merge = MergeConfig(
            min_sites=int(config.get("min-sites", 2)),
            timeout=float(config.get("timeout", 600.0)),
            param_weighting=str(config.get("param-weighting", "uniform")),
            buffer_mode=str(config.get("buffer-mode", "gaussian")),
            equal_site_stats=bool(config.get("equal-site-stats", False)),
            recalibrate=bool(config.get("recalibrate", False)),
            recalibrate_mode=str(config.get("recalibrate-mode", "batch")),
            param_precision=str(config.get("param-precision", "float64")),
        )
        return cls(
            arch=str(config.get("arch", "small_unet")),
            num_classes=int(config.get("num-classes", 9)),
            initial_weights=str(config.get("initial-weights", "")),
            out_dir=out_dir,
            merge=merge,
            eval_specs=_eval_specs(config),
            save_updates=bool(config.get("save-updates", False)),
            eval_sites=bool(config.get("eval-sites", False)),
            send_initial_weights=bool(config.get("send-initial-weights", True)),
            batch_size=int(config.get("batch-size", 8)),
            seed=int(config.get("seed", 0)),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "initial_weights": self.initial_weights,
            "send_initial_weights": self.send_initial_weights,
            "merge": asdict(self.merge),
            "eval_domains": sorted(self.eval_specs),
        }
