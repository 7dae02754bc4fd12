"""The comparison, end to end: data → source model → site adaptation (once) → every strategy → evaluation.

Every strategy gets the same :class:`~experiments.strategies.MergeInputs` (the same
cached site updates) and is scored on the same in-memory evaluation batches, so a
difference in the table is a difference between strategies and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from clients.site import recalibration_sums
from common.bn.bank import BNBank
from common.bn.stats import BNSums
from common.data import build_dataset, image_batches
from common.device.runtime import resolve_compute
from common.device.spec import Compute
from common.models.banked import BankedSegmenter
from common.scoring.label_free import label_free_scores, score_images
from common.updates.site import SiteUpdate
from common.updates.wire import sums_to_records, update_to_records, wire_bytes
from experiments.config import ExperimentConfig
from experiments.federated import run_fedavg_rounds
from experiments.pool import ModelPool, PoolEntry, SourceBundle, load_source
from experiments.strategies import MergeInputs, Outcome, get_strategy, interpolate, make_options
from experiments.tasks import TaskPool

__all__ = ["CompareResult", "LMCCurve", "LocalSites", "StrategyRow", "lmc_curve", "run_compare"]

log = logging.getLogger(__name__)


def update_bytes(update: SiteUpdate, method: str) -> int:
    """What this update weighs as the Flower reply a site sends (``common.updates.wire``)."""
    return wire_bytes(update_to_records(update, method))


def image_bytes(dataset: Dataset) -> int:
    """The site's images as 8-bit RGB: what data combination moves off the site."""
    total = 0
    for i in range(len(dataset)):  # type: ignore[arg-type]
        image, _ = dataset[i]
        total += image.numel()
    return total


@dataclass
class LocalSites:
    """The sites as the strategies may reach them again, all computed in this process."""

    config: ExperimentConfig
    source: SourceBundle
    pool: ModelPool
    data: dict[str, Dataset]
    cache_dir: Path
    pool_updates: dict[str, SiteUpdate] = field(default_factory=dict)  # each site's own adapted model
    compute: Compute = field(default_factory=Compute)  # resolved: where the sites recalibrate and score

    def bn_sums(self, site: str, state: Mapping[str, Tensor], mode: str) -> tuple[dict[str, BNSums], int, float]:
        started = time.perf_counter()
        sums = recalibration_sums(self.source.model(state), self.data[site], self.config.method.batch_size, mode,
                                  self.compute.device)  # fmt: skip
        seconds = time.perf_counter() - started
        return sums, wire_bytes(sums_to_records(sums, len(self.data[site]), site)), seconds

    def label_free(self, state: Mapping[str, Tensor], bank: BNBank | None) -> dict[str, dict[str, float]]:
        """Every label-free score of one model at each site, on (at most 16 of) its own images."""
        out: dict[str, dict[str, float]] = {}
        for site in self.config.sites:
            images = score_images(self.data[site.name])
            candidate = self.source.model(state)
            if bank is not None:
                candidate = BankedSegmenter(candidate, bank)
            candidate.to(self.compute.device)
            own = self.source.model(self.pool_updates[site.name].state_dict()).to(self.compute.device)
            batches = image_batches(images, self.config.method.batch_size)
            for name, value in label_free_scores(candidate, own, batches, seed=self.config.seed).items():
                out.setdefault(name, {})[site.name] = value
        return out

    def combined(self) -> tuple[SiteUpdate, dict[str, int], float]:
        union = ConcatDataset([self.data[s.name] for s in self.config.sites])
        data_id = "+".join(str(s.data) for s in self.config.sites)
        entry = self.pool.get("data-combination", union, data_id)
        return entry.update, {s.name: image_bytes(self.data[s.name]) for s in self.config.sites}, entry.adapt_seconds

    def fedavg(self, rounds: int, split_steps: bool, buffers: str) -> Outcome:
        run = run_fedavg_rounds(self.config, self.source, self.cache_dir, rounds, split_steps, buffers)
        notes = f"Flower FedAvg, {run.rounds} rounds, local options {run.options}; run {run.wall_seconds:.0f} s"
        return Outcome(state=run.state, rounds=run.rounds, bytes_sent=run.bytes_sent,
                       site_seconds=run.site_seconds, notes=notes)  # fmt: skip


@dataclass
class StrategyRow:
    label: str
    name: str
    per_domain: dict[str, float]
    harmonic_mean: float
    rounds: int
    bytes_sent: dict[str, int]
    test_time_domain: bool
    needs: str
    site_seconds: float
    strategy_seconds: float  # this run's wall time of the strategy (merge; in-process site work; Flower)
    notes: str = ""
    label_free: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> site -> value


@dataclass
class LMCCurve:
    sites: tuple[str, str]
    domains: list[str]
    alphas: list[float]
    harmonic_mean: dict[str, list[float]]  # "linear" / "gaussian" -> H at each alpha
    per_domain: dict[str, dict[str, list[float]]]  # buffer rule -> domain -> mIoU at each alpha


@dataclass
class SiteRecord:
    name: str
    data: str
    num_examples: int
    cache_key: str
    cached: bool
    adapt_seconds: float
    update_bytes: int
    ema_note: str
    metrics: dict[str, float]


@dataclass
class CompareResult:
    config: ExperimentConfig
    source: SourceBundle
    sites: list[SiteRecord]
    rows: list[StrategyRow]
    lmc: LMCCurve | None
    eval_images: dict[str, int]
    wall_seconds: float
    adapted_now: int  # adaptations computed in this run (the rest came from the cache)
    timings: dict[str, float] = field(default_factory=dict)


def lmc_curve(
    a: SiteUpdate, b: SiteUpdate, tasks: TaskPool, source: SourceBundle, points: int, domains: list[str]
) -> LMCCurve:
    """H along the line from site a to site b, BN statistics interpolated linearly or as Gaussian mixtures."""
    alphas = [i / (points - 1) for i in range(points)]
    h: dict[str, list[float]] = {"linear": [], "gaussian": []}
    per: dict[str, dict[str, list[float]]] = {rule: {d: [] for d in domains} for rule in h}
    for alpha in alphas:
        linear = tasks.score(source, interpolate(a, b, alpha, "linear"), domains=domains)
        ends = alpha in (0.0, 1.0)  # the two rules coincide at the ends: score once
        gaussian = linear if ends else tasks.score(source, interpolate(a, b, alpha, "gaussian"), domains=domains)
        for rule, scores in (("linear", linear), ("gaussian", gaussian)):
            h[rule].append(scores.harmonic_mean)
            for d in domains:
                per[rule][d].append(scores.per_domain[d])
    return LMCCurve((a.site, b.site), domains, alphas, h, per)


def _lmc_domains(config: ExperimentConfig, pair: tuple[str, str]) -> list[str]:
    """The evaluation domains of the two sites when they have some, else every domain."""
    own = [e.domain for e in config.eval_sets if e.site in pair]
    return own if own else [e.domain for e in config.eval_sets]


def run_compare(config: ExperimentConfig, cache_dir: Path) -> CompareResult:
    started = time.perf_counter()
    compute = resolve_compute(config.compute)  # a device this machine lacks fails here, before any work
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    cache_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    source = load_source(config.source, cache_dir)
    timings["source-seconds"] = time.perf_counter() - t
    tasks = TaskPool(config.eval_sets, config.eval_batch_size, compute)
    data = {s.name: build_dataset(s.data) for s in config.sites}

    t = time.perf_counter()
    pool = ModelPool(source, config.method, config.seed, cache_dir, compute)
    entries: dict[str, PoolEntry] = {s.name: pool.get(s.name, data[s.name], str(s.data)) for s in config.sites}
    timings["adaptation-seconds"] = time.perf_counter() - t
    updates = [entries[s.name].update for s in config.sites]
    local = LocalSites(config, source, pool, data, cache_dir, {u.site: u for u in updates}, compute)
    inputs = MergeInputs(
        base=source.state,
        updates=updates,
        ema_updates=[entries[s.name].ema_update() for s in config.sites],
        update_bytes={u.site: update_bytes(u, config.method.name) for u in updates},
        adapt_seconds={name: e.adapt_seconds for name, e in entries.items()},
        sites=local,
    )
    sites = [
        SiteRecord(s.name, str(s.data), entries[s.name].update.num_examples, entries[s.name].key,
                   entries[s.name].cached, entries[s.name].adapt_seconds, inputs.update_bytes[s.name],
                   entries[s.name].ema_note, dict(entries[s.name].update.metrics))
        for s in config.sites
    ]  # fmt: skip

    rows: list[StrategyRow] = []
    for entry in config.strategies:
        strategy, implied = get_strategy(entry.name)
        options = make_options(strategy, {**implied, **entry.options})
        log.info("strategy %s", entry.label)
        t = time.perf_counter()
        outcome = strategy.load()(inputs, options)
        strategy_seconds = time.perf_counter() - t
        scores = tasks.score(source, outcome.state, outcome.per_site, bank=outcome.bank)
        label_free = {} if outcome.state is None else local.label_free(outcome.state, outcome.bank)
        declared = strategy.options  # what the strategy needs, and whether the domain must be known
        rows.append(
            StrategyRow(entry.label, strategy.name, scores.per_domain, scores.harmonic_mean, outcome.rounds,
                        outcome.bytes_sent, declared.test_time_domain, declared.needs, outcome.site_seconds,
                        strategy_seconds, outcome.notes, label_free)
        )  # fmt: skip
        log.info("  %s: H %.4f %s", entry.label, scores.harmonic_mean, scores.per_domain)

    lmc = None
    if config.lmc is not None:
        t = time.perf_counter()
        a, b = (inputs.update(s) for s in config.lmc.sites)
        lmc = lmc_curve(a, b, tasks, source, config.lmc.points, _lmc_domains(config, config.lmc.sites))
        timings["lmc-seconds"] = time.perf_counter() - t
    return CompareResult(
        config=config,
        source=source,
        sites=sites,
        rows=rows,
        lmc=lmc,
        eval_images={d: tasks.num_images(d) for d in tasks.domains},
        wall_seconds=time.perf_counter() - started,
        adapted_now=len(pool.computed),
        timings=timings,
    )
