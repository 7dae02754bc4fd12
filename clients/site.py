"""One site's work, framework-free: adapt, measure exact BN statistics, build the update.

The Flower ClientApp is a thin shell around :func:`adapt_site` and
:func:`recalibration_sums`; the CLI and the experiments call them directly. The work runs
on the site's device (``AdaptContext.compute``); what it returns is on the CPU, because
that is what leaves the site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from clients.adaptation import METHODS, AdaptContext
from clients.guard import GuardConfig, guard_adaptation
from common.bn.stats import BNStatsConfig, BNSums, collect_bn_sums, exact_bn_statistics
from common.data import image_batches
from common.device.runtime import model_device, resolve_compute
from common.models.segmenter import Segmenter
from common.scoring.predictions import confident_fraction, normalized_entropy
from common.updates.site import SiteUpdate, split_state

__all__ = ["SiteJob", "adapt_site", "recalibration_sums", "unsupervised_metrics"]

log = logging.getLogger(__name__)


@dataclass
class SiteJob:
    """What a site is asked to do with its images."""

    domain: str
    method: str = "adabn"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    bn_mode: str = "batch"
    context: AdaptContext = field(default_factory=AdaptContext)
    guard: GuardConfig = field(default_factory=GuardConfig.read)  # the declared default: off


@torch.no_grad()
def unsupervised_metrics(model: Segmenter, target: Dataset, batch_size: int) -> dict[str, float]:
    """Mean normalised prediction entropy and the fraction of confident pixels: label-free health signals."""
    model.eval()
    device = model_device(model)
    ent_sum, conf_sum, images_seen = 0.0, 0.0, 0
    for images in image_batches(target, batch_size):
        probs = model(images.to(device)).softmax(1)
        ent_sum += float(normalized_entropy(probs).flatten(1).mean(1).sum())
        conf_sum += float(confident_fraction(probs).sum())
        images_seen += probs.shape[0]
    return {"mean-entropy": ent_sum / max(images_seen, 1), "confident-fraction": conf_sum / max(images_seen, 1)}


def adapt_site(model: Segmenter, target: Dataset, job: SiteJob) -> SiteUpdate:
    """Adapt ``model`` in place on ``target`` and return what may leave the site."""
    seconds = run_adaptation(model, target, job)
    log.info("site %s: %s done in %.1fs on %d images", job.domain, job.method, seconds, len(target))
    return package_update(model, target, job, seconds)


def run_adaptation(model: Segmenter, target: Dataset, job: SiteJob) -> float:
    """The first half of :func:`adapt_site`: the method, in place, then the guard if on; returns the method's seconds.

    A guard that falls back leaves the start's weights in ``model`` (``clients.guard``).
    Split out so that an experiment can look at the model between the method and the
    exact statistics pass (e.g. at the running statistics the method left). The model
    moves to the job's device (``auto`` resolved here, once) and stays there.
    """
    if len(target) == 0:
        raise ValueError(f"site {job.domain!r} has no target images")
    method = METHODS.get(job.method)
    config = method.make_options(job.method_options)
    if config.needs_source and job.context.source is None:
        raise ValueError(f"method {job.method!r} needs the labeled source set at the site; none was given")
    job.context.compute = resolve_compute(job.context.compute)
    model.to(job.context.compute.device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if job.guard.enabled else None
    started = time.perf_counter()
    method.load()(model, target, job.context, config)
    seconds = time.perf_counter() - started
    if start is not None:
        decision = guard_adaptation(model, start, target, job.guard, batch_size=job.batch_size, bn_mode=job.bn_mode,
                                    seed=job.context.seed)  # fmt: skip
        job.context.metrics.update(decision.metrics())
    return seconds


def package_update(model: Segmenter, target: Dataset, job: SiteJob, adapt_seconds: float) -> SiteUpdate:
    """The second half: the exact BN statistics pass, the label-free metrics, the update (its tensors on the CPU)."""
    started = time.perf_counter()
    counts = exact_bn_statistics(model, image_batches(target, job.batch_size), BNStatsConfig(job.bn_mode))
    metrics = {**job.context.metrics, **unsupervised_metrics(model, target, job.batch_size)}
    metrics.update({"adapt-seconds": adapt_seconds, "bn-seconds": time.perf_counter() - started})
    params, buffers = split_state({k: v.cpu() for k, v in model.state_dict().items()})
    return SiteUpdate(job.domain, params, buffers, counts, len(target), metrics)


def recalibration_sums(
    model: Segmenter, target: Dataset, batch_size: int, mode: str = "batch", device: str = "cpu"
) -> dict[str, BNSums]:
    """Σx, Σx², n per BN channel under the given (merged) parameters, measured on ``device``: round two's reply."""
    sums = collect_bn_sums(model.to(device), image_batches(target, batch_size), BNStatsConfig(mode))
    return {name: s.cpu() for name, s in sums.items()}
