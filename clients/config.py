"""A site's typed configuration, read from Flower's run config and node config.

Node config (set by each site's operator with ``--node-config``) wins over run config
(set by whoever starts the run), so data paths and the domain stay with the site. In
simulation, where node config is only ``partition-id``, the run config's ``domains``
list maps partitions to domains, and its ``site-data`` list, when given, to whole data specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clients.adaptation import AdaptContext
from clients.site import SiteJob
from common.data import DataSpec

__all__ = ["SiteConfig", "parse_options"]


def parse_options(text: str) -> dict[str, str]:
    """``"steps=200 lr=1e-4"`` (spaces or commas) to a dict; values are typed by the method's config."""
    options = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method-options item {item!r} is not key=value")
        options[key] = value
    return options


def _domain(config: Mapping[str, Any]) -> str:
    if str(config.get("domain", "")):
        return str(config["domain"])
    if "partition-id" not in config:
        raise ValueError("site has no 'domain' in its node config and no 'partition-id'")
    domains = [d.strip() for d in str(config.get("domains", "")).split(",") if d.strip()]
    pid = int(config["partition-id"])
    if pid >= len(domains):
        raise ValueError(f"partition {pid} has no domain: run config 'domains' lists only {domains}")
    return domains[pid]


def _partition_data(config: Mapping[str, Any]) -> DataSpec | None:
    """In simulation a run-config ``site-data`` list (";"-separated) may give each partition its own data."""
    specs = [s.strip() for s in str(config.get("site-data", "")).split(";") if s.strip()]
    if not specs or "partition-id" not in config:
        return None
    pid = int(config["partition-id"])
    if pid >= len(specs):
        raise ValueError(f"partition {pid} has no data: run config 'site-data' lists only {len(specs)} specs")
    return DataSpec.parse(specs[pid])


@dataclass(frozen=True)
class SiteConfig:
    arch: str
    num_classes: int
    data: DataSpec
    source: DataSpec | None
    job: SiteJob
    weights: str = ""  # node config: this site's local copy of the shared initial weights

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteConfig:
        merged = {**run_config, **node_config}
        domain = _domain(merged)
        data = _partition_data(merged) or DataSpec.from_config({**merged, "domain": domain})
        source = DataSpec.from_config(merged, prefix="source-") if str(merged.get("source-dataset", "")) else None
        options = parse_options(str(merged.get("method-options", "")))
        job = SiteJob(
            domain=domain,
            method=str(merged.get("method", "adabn")),
            method_options=options,
            batch_size=int(merged.get("batch-size", 8)),
            context=AdaptContext(
                checkpoint_dir=str(merged.get("checkpoint-dir", "")),
                progress=bool(merged.get("progress", False)),
                seed=int(merged.get("seed", 0)),
                backbone_weights=str(merged.get("backbone-weights", "")),
            ),
        )
        arch, num_classes = str(merged.get("arch", "small_unet")), int(merged.get("num-classes", 9))
        return cls(arch, num_classes, data, source, job, weights=str(node_config.get("weights", "")))
