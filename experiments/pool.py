"""The model pool: every site's adaptation run once, cached, and shared by every strategy.

Local adaptation is the expensive part of a comparison and the part that must be
identical across strategies, so each site's update is computed once and stored under a
hash of everything that produced it (source weights, data, method and its full typed
options, batch size, seed). A re-run with the same inputs reads the files back; changing
any input changes the key, so a stale update is never reused.

A guarded site is derived from the same site's unguarded entry: the guard judges only the
adapted model (under its exact statistics, which the cached update holds), its start and
the site's images, so hundreds of adaptation steps are not run again to try another guard
(``tests/test_site_guard.py`` checks the derived entry equals the inline guard bit for bit).

Besides the update a site would send (parameters, exact BN statistics, sample counts),
the pool keeps the BN running statistics as they stood before the exact statistics
pass: what the published merging code would read from the site's checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from clients.adaptation import METHODS, AdaptContext
from clients.guard import GuardConfig, guard_adaptation
from clients.site import SiteJob, package_update, run_adaptation
from common.data import build_dataset, image_batches
from common.device.runtime import model_device
from common.device.spec import Compute
from common.models.checkpoints import load_checkpoint, read_model_file, wrap_checkpoint_for_hrda
from common.models.factory import build_model
from common.models.fingerprint import recipe_key, state_fingerprint
from common.models.segmenter import Segmenter
from common.training.pretrain import pretrain_to_file
from common.updates.files import load_site_update, save_site_update
from common.updates.site import SiteUpdate, split_state
from experiments.config import LocalMethod, SourceModel

__all__ = [
    "CACHE_VERSION",
    "EMA_FROM_METHOD",
    "EMA_FROM_TRAIN_PASS",
    "ModelPool",
    "PoolEntry",
    "SourceBundle",
    "adapt_with_ema",
    "load_source",
]

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when what a cached update means changes
EMA_FROM_METHOD = "EMA running statistics left by the method's own training"
EMA_FROM_TRAIN_PASS = "the method left the running statistics untouched: one PyTorch train-mode pass (momentum 0.1)"


@dataclass(frozen=True)
class SourceBundle:
    """The shared start: its weights, how to rebuild it, and the file it lives in."""

    state: dict[str, Tensor]
    arch: str
    classes: list[str]
    path: Path
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model(self, state: Mapping[str, Tensor] | None = None) -> Segmenter:
        """A fresh model with ``state`` (default: the source weights), in eval mode."""
        model = build_model(self.arch, self.num_classes)
        model.load_state_dict(dict(state if state is not None else self.state), strict=True)
        return model.eval()


def load_source(source: SourceModel, cache_dir: Path) -> SourceBundle:
    """The checkpoint when it exists, else the pretraining plan's model (pretrained once, then cached)."""
    if source.checkpoint and Path(source.checkpoint).is_file():
        path = Path(source.checkpoint)
    elif source.pretrain is not None:
        plan = source.pretrain
        path = cache_dir / f"source-{recipe_key(plan.key(), length=16)}.safetensors"
        if not path.is_file():
            if source.checkpoint:
                log.warning("source checkpoint %s not found; pretraining from the plan instead", source.checkpoint)
            log.info("pretraining the source model: %s, %d steps on %s", plan.arch, plan.steps, plan.data)
            pretrain_to_file(plan, path, progress=False)
        else:
            log.info("reusing the cached source model %s", path)
    else:
        raise FileNotFoundError(f"source checkpoint not found: {source.checkpoint} (and no pretraining plan)")
    if source.wrap == "hrda":
        path = _wrapped(path, cache_dir)
    model, meta = load_checkpoint(path, with_bank=False)
    classes = [c for c in meta.get("classes", "").split(",") if c] or [str(i) for i in range(int(meta["num_classes"]))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return SourceBundle(state, meta["arch"], classes, path.resolve(), state_fingerprint(state)[:20])


def _wrapped(path: Path, cache_dir: Path) -> Path:
    """The checkpoint wrapped as ``hrda_<arch>``, once per source (the attention head is seeded: same everywhere)."""
    wrapped = cache_dir / f"source-hrda-{state_fingerprint(read_model_file(path).state)[:16]}.safetensors"
    if not wrapped.is_file():
        log.info("wrapping %s as a multi-resolution (hrda_) model", path)
        wrap_checkpoint_for_hrda(path, wrapped)
    return wrapped


def _bn_buffers(model: Segmenter) -> dict[str, Tensor]:
    """The BN buffers, copied to the CPU (where the cache files are written from)."""
    _, buffers = split_state(model.state_dict())
    return {k: v.detach().cpu().clone() for k, v in buffers.items()}


@torch.no_grad()
def _train_mode_pass(model: Segmenter, target: Dataset, batch_size: int) -> dict[str, Tensor]:
    """The running statistics one epoch of PyTorch's train-mode BN would leave (momentum as set)."""
    probe = copy.deepcopy(model).train()
    device = model_device(probe)
    for images in image_batches(target, batch_size):
        probe(images.to(device))
    return _bn_buffers(probe)


def adapt_with_ema(model: Segmenter, target: Dataset, job: SiteJob) -> tuple[SiteUpdate, dict[str, Tensor], str]:
    """``clients.site.adapt_site``'s steps, keeping the running statistics before the exact pass.

    Returns the update exactly as ``adapt_site`` builds it, the EMA buffers the published
    code would merge, and where those came from (see ``EMA_FROM_*``).
    """
    before = _bn_buffers(model)
    seconds = run_adaptation(model, target, job)
    ema = _bn_buffers(model)
    untouched = all(torch.equal(before[k], ema[k]) for k in before if k.endswith(".num_batches_tracked"))
    note = EMA_FROM_METHOD
    if untouched:
        ema, note = _train_mode_pass(model, target, job.batch_size), EMA_FROM_TRAIN_PASS
    return package_update(model, target, job, seconds), ema, note


@dataclass
class PoolEntry:
    """One site's cached work."""

    update: SiteUpdate
    ema_buffers: dict[str, Tensor]
    ema_note: str
    key: str
    cached: bool  # read back from the cache in this run
    adapt_seconds: float  # wall time of the adaptation when it was computed

    def ema_update(self) -> SiteUpdate:
        """The update as the published code would see it: same parameters, EMA statistics."""
        u = self.update
        return SiteUpdate(u.site, u.params, self.ema_buffers, u.counts, u.num_examples, u.metrics)


class ModelPool:
    """Site updates keyed by everything that produced them; computed on first request, then read back."""

    def __init__(
        self, source: SourceBundle, method: LocalMethod, seed: int, cache_dir: Path, compute: Compute = Compute()
    ) -> None:
        """``compute``: a resolved device (``common.device.runtime.resolve_compute``) and the sites' amp."""
        self.source, self.method, self.seed, self.compute = source, method, seed, compute
        self.folder = cache_dir / "updates"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._source_data: Dataset | None = None
        self.computed: list[str] = []  # keys adapted (not read back) in this process

    def key(self, data_id: str) -> str:
        """Hash of source weights, data, method with its full typed options, batch size, seed, guard and device.

        The device enters only when it is not the CPU at full precision, so every key cached
        before devices existed stays valid.
        """
        options = METHODS.get(self.method.name).make_options(self.method.options)
        recipe = {
            "version": CACHE_VERSION,
            "source": self.source.fingerprint,
            "arch": self.source.arch,
            "data": data_id,
            "method": self.method.name,
            "options": repr(options),
            "batch_size": self.method.batch_size,
            "method_source": str(self.method.source) if self.method.source else "",
            "seed": self.seed,
            **self.method.guard.recipe(),
            **self.method.recipe(),
            **self.compute.recipe(),
        }
        return recipe_key(recipe)

    def _context(self) -> AdaptContext:
        if self.method.source is not None and self._source_data is None:
            self._source_data = build_dataset(self.method.source)
        return AdaptContext(source=self._source_data, progress=False, seed=self.seed, compute=self.compute,
                            backbone_weights=self.method.backbone_weights)  # fmt: skip

    def get(self, site: str, target: Dataset, data_id: str) -> PoolEntry:
        """``site``'s update on ``target`` (described by ``data_id``), from the cache when present."""
        key = self.key(data_id)
        files = self._files(key)
        if files["meta"].is_file():
            return self._read(site, key, files)
        started = time.perf_counter()
        if self.method.guard.enabled:
            unguarded = self.unguarded().get(site, target, data_id)
            update, ema, note = self._guarded(unguarded, target)
            seconds = unguarded.adapt_seconds + time.perf_counter() - started
        else:
            log.info("adapting site %s with %s on %d images (cache key %s)", site, self.method.name, len(target), key)
            torch.manual_seed(self.seed)
            job = SiteJob(site, self.method.name, dict(self.method.options), self.method.batch_size,
                          context=self._context(), guard=self.method.guard)  # fmt: skip
            update, ema, note = adapt_with_ema(self.source.model(), target, job)
            seconds = time.perf_counter() - started
        self._write(files, site, data_id, update, ema, note, seconds)
        self.computed.append(key)
        return PoolEntry(update, ema, note, key, cached=False, adapt_seconds=seconds)

    def unguarded(self) -> ModelPool:
        """The same pool with the guard off: where a guarded entry's adaptation comes from."""
        method = replace(self.method, guard=GuardConfig.read({"guard": False}))
        pool = ModelPool(self.source, method, self.seed, self.folder.parent)
        pool._source_data = self._source_data
        return pool

    def _guarded(self, unguarded: PoolEntry, target: Dataset) -> tuple[SiteUpdate, dict[str, Tensor], str]:
        """What ``adapt_with_ema`` with the guard on returns, from the unguarded entry of the same site.

        The guard scores the adapted model under the exact statistics of the site's images,
        which it measures again whatever statistics the model holds, so the cached update
        (adapted parameters, exact statistics) is all it needs of the adaptation.
        """
        site = unguarded.update.site
        log.info("site %s: guarding the cached adaptation %s", site, unguarded.key)
        model = self.source.model(unguarded.update.state_dict())
        job = SiteJob(site, self.method.name, dict(self.method.options), self.method.batch_size,
                      context=AdaptContext(progress=False, seed=self.seed), guard=self.method.guard)  # fmt: skip
        decision = guard_adaptation(model, self.source.state, target, self.method.guard,
                                    batch_size=job.batch_size, bn_mode=job.bn_mode, seed=self.seed)  # fmt: skip
        job.context.metrics.update({**unguarded.update.metrics, **decision.metrics()})
        ema, note = unguarded.ema_buffers, unguarded.ema_note
        if decision.alpha < 1.0:  # the start's buffers are back: what a train-mode pass over the images leaves
            ema, note = _train_mode_pass(model, target, job.batch_size), EMA_FROM_TRAIN_PASS
        seconds = float(unguarded.update.metrics.get("adapt-seconds", unguarded.adapt_seconds))
        return package_update(model, target, job, seconds), ema, note

    def _write(self, files: dict[str, Path], site: str, data_id: str, update: SiteUpdate, ema: dict[str, Tensor],
               note: str, seconds: float) -> None:  # fmt: skip
        save_site_update(files["update"], update, self.source.arch, self.source.num_classes)
        save_file({k: v.contiguous() for k, v in ema.items()}, str(files["ema"]))
        meta = {"site": site, "data": data_id, "method": self.method.name, "options": dict(self.method.options),
                "seed": self.seed, "source": str(self.source.path), "adapt_seconds": seconds,
                "metrics": update.metrics, "ema_note": note}  # fmt: skip
        tmp = files["meta"].with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(files["meta"])  # the metadata file is written last: its presence marks a complete entry

    def _files(self, key: str) -> dict[str, Path]:
        return {
            "update": self.folder / f"{key}.safetensors",
            "ema": self.folder / f"{key}.ema.safetensors",
            "meta": self.folder / f"{key}.json",
        }

    def _read(self, site: str, key: str, files: dict[str, Path]) -> PoolEntry:
        meta = json.loads(files["meta"].read_text())
        update, _ = load_site_update(files["update"], site=site)
        update.metrics = {k: float(v) for k, v in meta.get("metrics", {}).items()}
        log.info("site %s: reusing cached update %s", site, key)
        return PoolEntry(
            update, load_file(str(files["ema"])), meta["ema_note"], key, True, float(meta["adapt_seconds"])
        )
