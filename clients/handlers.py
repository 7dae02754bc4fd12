"""What a site answers to each message of the protocol: RecordDict in, RecordDict out, framework-free maths below.

Only parameters, BN buffers, counts, the domain name, the method and unsupervised
scalars leave the site (see ``common.updates.wire``); images and labels never do. Each
function here answers one :class:`~common.updates.wire.Action`; ``clients.client_app``
routes Flower's messages to them.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch.utils.data import Dataset

from clients import secure_site
from clients.config import SiteConfig
from clients.site import adapt_site, recalibration_sums
from common.bn.bank import BNBank
from common.data import DataSpec, build_dataset, image_batches
from common.device.runtime import resolve_compute
from common.models.banked import BankedSegmenter
from common.models.factory import build_model
from common.models.fingerprint import INITIAL_SHA256, state_fingerprint
from common.models.segmenter import Segmenter
from common.scoring.label_free import label_free_scores, score_images
from common.secure.layout import merge_segments, statistics_segments
from common.updates.site import SiteUpdate, split_state
from common.updates.wire import census_records, sums_to_records, update_to_records

__all__ = ["adapt", "census", "evaluate", "recalibrate", "score", "secagg_advertise", "secagg_masked_input",
           "secagg_share_keys", "secagg_unmask"]  # fmt: skip

# This worker's start-up: from its process starting to this module being loaded (interpreter, Flower, torch, ours).
STARTUP_SECONDS = time.time() - psutil.Process().create_time()
SECURE_UPDATE, SECURE_STATISTICS = "secagg-update", "secagg-statistics"  # kept in context.state between messages
OWN_MODEL = "own-model"  # the site's adapted model, kept while a label-free selection scores candidates


@lru_cache(maxsize=4)
def _dataset(spec: DataSpec) -> Dataset:
    """A site's data set, built once per worker: later rounds (census, recalibration, FedAvg) reuse it."""
    return build_dataset(spec)


def _config(received: RecordDict) -> ConfigRecord:
    return received["config"] if "config" in received else ConfigRecord()  # type: ignore[return-value]


def _device(site: SiteConfig) -> str:
    """This site's device (its node config may name its own): the query rounds run there too."""
    return resolve_compute(site.compute).device


def _sent_model(received: RecordDict, site: SiteConfig) -> Segmenter:
    model = build_model(site.arch, site.num_classes)
    model.load_state_dict(received["arrays"].to_torch_state_dict(), strict=True)  # type: ignore[union-attr]
    return model


def initial_model(received: RecordDict, site: SiteConfig) -> Segmenter:
    """The run's starting model; a site holding the shared weights locally uses its copy, if it is the same model.

    The server always sends the initial model's fingerprint, and with ``send-initial-weights
    = false`` no arrays at all: a site then needs node config ``weights`` = a local file.
    """
    sent = received["arrays"]
    if not site.weights:
        if len(sent) == 0:
            raise ValueError(
                "the server sent no initial weights (send-initial-weights = false) and this site's node config "
                "names no local 'weights' file"
            )
        return _sent_model(received, site)
    model = build_model(site.arch, site.num_classes, weights=site.weights)
    expected = str(_config(received).get(INITIAL_SHA256, ""))
    if not expected and len(sent) > 0:
        expected = state_fingerprint(sent.to_torch_state_dict())
    local = state_fingerprint(model.state_dict())
    if local != expected:
        raise ValueError(
            f"local weights {site.weights} (sha256 {local[:16]}) are not the run's initial model "
            f"(sha256 {expected[:16] or 'unknown'})"
        )
    return model


def round_offset(received: RecordDict) -> int:
    """How far this round's seed is from the run's: 0 in round 1 (the one-shot merge), then round - 1.

    A multi-round run (FedAvg) must not replay the same batches and augmentations every round.
    """
    return max(int(_config(received).get("server-round", 1)), 1) - 1  # type: ignore[arg-type]


def adapt(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """Adapt and answer: the update, or in secure mode only public keys and the image count."""
    started, started_wall = time.perf_counter(), time.time()
    job = site.job(seed_offset=round_offset(received))
    model = initial_model(received, site)
    if site.source is not None:
        job.context.source = _dataset(site.source)
    target = _dataset(site.data)
    ready = time.perf_counter()
    update = adapt_site(model, target, job)
    if _config(received).get("keep-own"):  # a label-free selection will ask to score candidates against it
        context.state[OWN_MODEL] = ArrayRecord(update.state_dict())
    if _config(received).get("secure"):  # keep the update here; only public keys and the image count leave
        context.state[SECURE_UPDATE] = ArrayRecord(update.state_dict())
        return secure_site.advertise(context, len(target), site.domain)
    if site.run.profile:  # where the worker's time went, for benchmarks/sim_overhead.py
        update.metrics.update({
            "clientapp-startup-seconds": STARTUP_SECONDS, "clientapp-setup-seconds": ready - started,
            "clientapp-started-at": started_wall, "clientapp-replied-at": time.time(),
        })  # fmt: skip
    return update_to_records(update, site.run.method)


def census(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """How many images this site holds: a scalar, nothing else."""
    return census_records(len(_dataset(site.data)), site.domain)


def recalibrate(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """Σx, Σx², n per BN channel of this site's images under the merged parameters sent."""
    target = _dataset(site.data)
    mode = str(_config(received).get("bn-mode", "batch"))
    sums = recalibration_sums(_sent_model(received, site), target, site.run.batch_size, mode, _device(site))
    return sums_to_records(sums, len(target), site.domain)


def score(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """Every label-free score of the candidate sent, on (at most 16 of) this site's images: scalars only."""
    candidate = _sent_model(received, site)
    if "bank" in received:
        config = _config(received)
        names = tuple(str(n) for n in config["bank-names"])  # type: ignore[union-attr]
        weight = float(config.get("bank-image-weight", 0.0))  # type: ignore[arg-type]
        bank = BNBank.from_tensors(received["bank"].to_torch_state_dict(), names, weight)
        candidate = BankedSegmenter(candidate, bank)
    candidate.to(_device(site))
    own = None
    if OWN_MODEL in context.state:
        own = build_model(site.arch, site.num_classes).to(_device(site))
        own.load_state_dict(context.state[OWN_MODEL].to_torch_state_dict())
    batches = image_batches(score_images(_dataset(site.data)), site.run.batch_size)
    scores = label_free_scores(candidate, own, batches, seed=site.run.seed)
    return RecordDict({"scores": MetricRecord(scores), "info": ConfigRecord({"domain": site.domain})})


def evaluate(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """Flower's evaluate round: the final model's label-free scores here (the same scores as a candidate's)."""
    return score(received, site, context)


def secagg_advertise(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    """The recalibration, secured: this site's BN moments under the merged model kept here, its keys sent."""
    target = _dataset(site.data)
    mode = str(_config(received).get("bn-mode", "batch"))
    sums = recalibration_sums(_sent_model(received, site), target, site.run.batch_size, mode, _device(site))
    moments = {f"{layer}.mean": s.mean() for layer, s in sums.items()}
    moments.update({f"{layer}.second": s.sum_sq / s.count for layer, s in sums.items()})
    context.state[SECURE_STATISTICS] = ArrayRecord(moments)
    return secure_site.advertise(context, len(target), site.domain)


def secagg_share_keys(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    return secure_site.share_keys(context, _config(received))


def _secure_segments(context: Context, config: ConfigRecord) -> list[np.ndarray]:
    """This site's vector for the secure sum in progress: its update, or its statistics under the merged model."""
    param_weight, stats_weight = float(config["param-weight"]), float(config["stats-weight"])  # type: ignore[arg-type]
    if config.get("sum") == "statistics":
        stored = context.state[SECURE_STATISTICS].to_torch_state_dict()
        layers = [k[: -len(".mean")] for k in stored if k.endswith(".mean")]
        means = {layer: stored[f"{layer}.mean"] for layer in layers}
        seconds = {layer: stored[f"{layer}.second"] for layer in layers}
        return statistics_segments(means, seconds, layers, stats_weight)
    state = context.state[SECURE_UPDATE].to_torch_state_dict()
    params, buffers = split_state(state)
    update = SiteUpdate("", params, buffers, {}, 1)
    return merge_segments(update, state, param_weight, stats_weight)


def secagg_masked_input(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    config = _config(received)
    return secure_site.masked_input_reply(context, config, _secure_segments(context, config))


def secagg_unmask(received: RecordDict, site: SiteConfig, context: Context) -> RecordDict:
    config = _config(received)
    content = secure_site.unmask_reply(context, config)
    stored = SECURE_UPDATE if config.get("sum") == "merge" else SECURE_STATISTICS
    if stored in context.state:
        del context.state[stored]  # this sum is over: its input does not stay either
    return content
