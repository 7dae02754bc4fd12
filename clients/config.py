"""A site's typed configuration: the run config (one reader, ``common.config.run``) under its node config.

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
from clients.guard import GUARD_KEYS, GuardConfig
from clients.site import SiteJob
from common.config.run import ConfigError, RunConfig, declared_defaults
from common.data import DataSpec
from common.device.spec import Compute
from common.options.typed import closest, parse_key_values

__all__ = ["NODE_ONLY_KEYS", "SiteConfig"]

# Keys only a site's operator sets: who this site is and what it holds locally.
NODE_ONLY_KEYS = {"domain": str, "weights": str, "partition-id": int, "num-partitions": int}


def _domain(run: RunConfig, node: Mapping[str, Any]) -> str:
    if str(node.get("domain", "")):
        return str(node["domain"])
    if "partition-id" not in node:
        raise ConfigError("site has no 'domain' in its node config and no 'partition-id'")
    domains = [d.strip() for d in run.domains.split(",") if d.strip()]
    pid = int(node["partition-id"])
    if pid >= len(domains):
        raise ConfigError(f"partition {pid} has no domain: run config 'domains' lists only {domains}")
    return domains[pid]


def _partition_data(run: RunConfig, node: Mapping[str, Any]) -> DataSpec | None:
    """In simulation a run-config ``site-data`` list (";"-separated) may give each partition its own data."""
    specs = [s.strip() for s in run.site_data.split(";") if s.strip()]
    if not specs or "partition-id" not in node:
        return None
    pid = int(node["partition-id"])
    if pid >= len(specs):
        raise ConfigError(f"partition {pid} has no data: run config 'site-data' lists only {len(specs)} specs")
    return DataSpec.parse(specs[pid])


def _split_node_config(node_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config keys the node overrides, node-only keys); an unknown key is refused by name."""
    run_keys, node_keys = {}, {}
    declared = declared_defaults()
    for key, value in node_config.items():
        if key in NODE_ONLY_KEYS:
            node_keys[key] = value
        elif key in declared:
            run_keys[key] = value
        else:
            raise ConfigError(f"unknown node-config key {key!r}{closest(key, [*declared, *NODE_ONLY_KEYS])}")
    return run_keys, node_keys


@dataclass(frozen=True)
class SiteConfig:
    run: RunConfig
    data: DataSpec
    source: DataSpec | None
    job: SiteJob
    weights: str = ""  # node config: this site's local copy of the shared initial weights

    @property
    def arch(self) -> str:
        return self.run.arch

    @property
    def num_classes(self) -> int:
        return self.run.num_classes

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteConfig:
        run_keys, node = _split_node_config(node_config)
        run = RunConfig.read({**run_config, **run_keys})
        domain = _domain(run, node)
        flat = run.to_flower()
        data = _partition_data(run, node) or DataSpec.from_config({**flat, "domain": domain})
        source = DataSpec.from_config(flat, prefix="source-") if run.source_dataset else None
        job = SiteJob(
            domain=domain,
            method=run.method,
            method_options=parse_key_values(run.method_options, "method-options"),
            batch_size=run.batch_size,
            context=AdaptContext(
                checkpoint_dir=run.checkpoint_dir,
                progress=run.progress,
                seed=run.seed,
                backbone_weights=run.backbone_weights,
                compute=Compute(run.device, run.amp),  # node config may set it; resolved where the site computes
            ),
            guard=GuardConfig.read({k: flat[k] for k in GUARD_KEYS}),
        )
        return cls(run, data, source, job, weights=str(node.get("weights", "")))
