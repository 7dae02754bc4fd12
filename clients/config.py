"""A site's typed configuration: the run config (one reader, ``common.config.run``) under its node config.

Node config (set by each site's operator with ``--node-config``) wins over run config
(set by whoever starts the run), so data paths and the domain stay with the site: a site
names its data with node config ``site-data``, or with ``domain`` when the run config's
``site-data`` is a ``{domain}`` template. In simulation, where node config is only
``partition-id``, partition i takes item i of the run config's ``site-data`` list.

A site's configuration is read once and kept for the run; what a message changes (the
round's seed, the source set, the metrics a method records) goes into a fresh
:class:`~clients.site.SiteJob` built for that message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clients.adaptation import AdaptContext
from clients.guard import GuardConfig
from clients.site import SiteJob
from common.config.run import REPLACED_KEYS, ConfigError, RunConfig, declared_defaults
from common.data.spec import DOMAIN_FIELD, DataSpec, NamedSpec, fill_domain, parse_spec_list
from common.device.spec import Compute
from common.options.typed import closest, parse_key_values

__all__ = ["NODE_ONLY_KEYS", "SiteConfig"]

# Keys only a site's operator sets: who this site is and what it holds locally.
NODE_ONLY_KEYS = {"domain": str, "weights": str, "partition-id": int, "num-partitions": int}


def _site_spec(run: RunConfig, node: Mapping[str, Any]) -> NamedSpec:
    """This site's name and data: its own domain in a ``{domain}`` template, else its item of ``site-data``."""
    domain = str(node.get("domain", ""))
    if DOMAIN_FIELD in run.site_data:
        if not domain:
            raise ConfigError("run config 'site-data' is a {domain} template: this site's node config needs 'domain'")
        return NamedSpec(domain, parse_spec_list(fill_domain(run.site_data, domain), "site-data")[0].spec)
    items = run.site_list()
    if "partition-id" in node:
        pid = int(node["partition-id"])
        if pid >= len(items):
            raise ConfigError(f"partition {pid} has no data: run config 'site-data' lists only {len(items)} specs")
        item = items[pid]
    elif len(items) == 1:
        item = items[0]
    else:
        raise ConfigError(f"run config 'site-data' lists {len(items)} specs and this site has no 'partition-id': "
                          "name its data in its node config (site-data = \"SPEC\")")  # fmt: skip
    return NamedSpec(domain or item.name, item.spec)


def _split_node_config(node_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config keys the node overrides, node-only keys); an unknown key is refused by name."""
    run_keys, node_keys = {}, {}
    declared = declared_defaults()
    for key, value in node_config.items():
        if key in NODE_ONLY_KEYS:
            node_keys[key] = value
        elif key in declared or key in REPLACED_KEYS:
            run_keys[key] = value  # a replaced key is refused by the run-config reader, naming its successor
        else:
            raise ConfigError(f"unknown node-config key {key!r}{closest(key, [*declared, *NODE_ONLY_KEYS])}")
    return run_keys, node_keys


@dataclass(frozen=True)
class SiteConfig:
    run: RunConfig
    domain: str
    data: DataSpec
    source: DataSpec | None
    method_options: Mapping[str, str]
    guard: GuardConfig
    weights: str = ""  # node config: this site's local copy of the shared initial weights

    @property
    def arch(self) -> str:
        return self.run.arch

    @property
    def num_classes(self) -> int:
        return self.run.num_classes

    @property
    def compute(self) -> Compute:
        """Where this site computes and at what precision (node config may set its own); resolved where it runs."""
        return Compute(self.run.device, self.run.amp)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteConfig:
        run_keys, node = _split_node_config(node_config)
        run = RunConfig.read({**run_config, **run_keys})
        site = _site_spec(run, node)
        guard = GuardConfig(run.guard, tuple(s.strip() for s in run.guard_score.split(",")), run.guard_margin,
                            run.guard_rule, run.guard_max_change)  # fmt: skip
        options = parse_key_values(run.method_options, "method-options")
        return cls(run, site.name, site.spec, run.source_spec(), options, guard, str(node.get("weights", "")))

    def job(self, seed_offset: int = 0) -> SiteJob:
        """What this site does for one message: a fresh context, so nothing a method records leaks into the next."""
        run = self.run
        context = AdaptContext(checkpoint_dir=run.checkpoint_dir, progress=run.progress, seed=run.seed + seed_offset,
                               backbone_weights=run.backbone_weights, compute=self.compute)  # fmt: skip
        return SiteJob(self.domain, run.method, dict(self.method_options), run.batch_size, context=context,
                       guard=self.guard)  # fmt: skip
