"""The Flower ClientApp: load the global model, adapt locally, reply with the update.

Only parameters, BN buffers, counts, the domain name, the method and unsupervised
scalars leave the site (see ``common.updates.wire``); images and labels never do.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from clients import secure_site
from clients.config import SiteConfig
from clients.site import adapt_site, recalibration_sums
from common.bn.bank import BNBank
from common.data import DataSpec, build_dataset, image_batches
from common.device.runtime import resolve_compute
from common.models.architectures import Segmenter
from common.models.banked import BankedSegmenter
from common.models.factory import build_model
from common.models.fingerprint import INITIAL_SHA256, state_fingerprint
from common.scoring.label_free import label_free_scores, score_images
from common.secure.layout import merge_segments, statistics_segments
from common.updates.site import SiteUpdate, split_state
from common.updates.wire import census_records, sums_to_records, update_to_records

# This worker's start-up: from its process starting to this app being loaded (interpreter, Flower, torch, ours).
STARTUP_SECONDS = time.time() - psutil.Process().create_time()
app = ClientApp()
SECURE_UPDATE, SECURE_STATISTICS = "secagg-update", "secagg-statistics"  # kept in context.state between messages
OWN_MODEL = "own-model"  # the site's adapted model, kept while a label-free selection scores candidates


@lru_cache(maxsize=4)
def _dataset(spec: DataSpec) -> Dataset:
    """A site's data set, built once per worker: later rounds (census, recalibration, FedAvg) reuse it."""
    return build_dataset(spec)


def _site_config(context: Context) -> SiteConfig:
    return SiteConfig.from_flower(context.run_config, context.node_config)


def _global_model(received: RecordDict, config: SiteConfig) -> Segmenter:
    model = build_model(config.arch, config.num_classes)
    model.load_state_dict(received["arrays"].to_torch_state_dict(), strict=True)  # type: ignore[union-attr]
    return model


def _device(config: SiteConfig) -> str:
    """This site's device (its node config may name its own): the query rounds run there too."""
    return resolve_compute(config.job.context.compute).device


def initial_model(received: RecordDict, config: SiteConfig) -> Segmenter:
    """The run's starting model; a site holding the shared weights locally uses its copy, if it is the same model.

    The server always sends the initial model's fingerprint, and with ``send-initial-weights
    = false`` no arrays at all: a site then needs node config ``weights`` = a local file.
    """
    sent = received["arrays"]
    if not config.weights:
        if len(sent) == 0:
            raise ValueError(
                "the server sent no initial weights (send-initial-weights = false) and this site's node config "
                "names no local 'weights' file"
            )
        return _global_model(received, config)
    model = build_model(config.arch, config.num_classes, weights=config.weights)
    expected = str(_config(received).get(INITIAL_SHA256, ""))
    if not expected and len(sent) > 0:
        expected = state_fingerprint(sent.to_torch_state_dict())
    local = state_fingerprint(model.state_dict())
    if local != expected:
        raise ValueError(
            f"local weights {config.weights} (sha256 {local[:16]}) are not the run's initial model "
            f"(sha256 {expected[:16] or 'unknown'})"
        )
    return model


def round_seed(received: RecordDict, seed: int) -> int:
    """The adaptation seed of this round: ``seed`` in round 1 (the one-shot merge), then seed + round - 1.

    A multi-round run (FedAvg) must not replay the same batches and augmentations every round.
    """
    server_round = int(_config(received).get("server-round", 1))  # type: ignore[arg-type]
    return seed + max(server_round, 1) - 1


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=handle_train(msg.content, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The light rounds: a census (the number of images), recalibration (BN sums), secure-sum steps."""
    return Message(content=handle_query(msg.content, context), reply_to=msg)


def handle_train(received: RecordDict, context: Context) -> RecordDict:
    """Adapt and answer: the update, or in secure mode only public keys and the image count."""
    started, started_wall = time.perf_counter(), time.time()
    config = _site_config(context)
    config.job.context.seed = round_seed(received, config.job.context.seed)
    model = initial_model(received, config)
    if config.source is not None:
        config.job.context.source = _dataset(config.source)
    target = _dataset(config.data)
    ready = time.perf_counter()
    update = adapt_site(model, target, config.job)
    if _config(received).get("keep-own"):  # a label-free selection will ask to score candidates against it
        context.state[OWN_MODEL] = ArrayRecord(update.state_dict())
    if _config(received).get("secure"):  # keep the update here; only public keys and the image count leave
        context.state[SECURE_UPDATE] = ArrayRecord(update.state_dict())
        return secure_site.advertise(context, len(target), config.job.domain)
    if config.run.profile:  # where the worker's time went, for benchmarks/sim_overhead.py
        update.metrics.update({
            "clientapp-startup-seconds": STARTUP_SECONDS, "clientapp-setup-seconds": ready - started,
            "clientapp-started-at": started_wall, "clientapp-replied-at": time.time(),
        })  # fmt: skip
    return update_to_records(update, config.job.method)


def _config(received: RecordDict) -> ConfigRecord:
    return received["config"] if "config" in received else ConfigRecord()  # type: ignore[return-value]


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


def _secure_query(received: RecordDict, context: Context, config: SiteConfig, phase: str) -> RecordDict:
    settings = _config(received)
    if phase == "secagg-advertise":  # the recalibration round, secured: moments under the merged model
        target = _dataset(config.data)
        model = _global_model(received, config)
        sums = recalibration_sums(model, target, config.job.batch_size, str(settings.get("bn-mode", "batch")),
                                  _device(config))  # fmt: skip
        moments = {f"{layer}.mean": s.mean() for layer, s in sums.items()}
        moments.update({f"{layer}.second": s.sum_sq / s.count for layer, s in sums.items()})
        context.state[SECURE_STATISTICS] = ArrayRecord(moments)
        content = secure_site.advertise(context, len(target), config.job.domain)
    elif phase == "secagg-share-keys":
        content = secure_site.share_keys(context, settings)
    elif phase == "secagg-masked-input":
        content = secure_site.masked_input_reply(context, settings, _secure_segments(context, settings))
    elif phase == "secagg-unmask":
        content = secure_site.unmask_reply(context, settings)
        stored = SECURE_UPDATE if settings.get("sum") == "merge" else SECURE_STATISTICS
        if stored in context.state:
            del context.state[stored]  # this sum is over: its input does not stay either
    else:
        raise ValueError(f"unknown secure-aggregation step {phase!r}")
    return content


def _score_candidate(received: RecordDict, context: Context, config: SiteConfig, target: Dataset) -> RecordDict:
    """Every label-free score of the candidate sent, on (at most 16 of) this site's images: scalars only."""
    candidate = _global_model(received, config)
    if "bank" in received:
        names = tuple(str(n) for n in _config(received)["bank-names"])  # type: ignore[union-attr]
        candidate = BankedSegmenter(candidate, BNBank.from_tensors(received["bank"].to_torch_state_dict(), names))
    candidate.to(_device(config))
    own = None
    if OWN_MODEL in context.state:
        own = build_model(config.arch, config.num_classes).to(_device(config))
        own.load_state_dict(context.state[OWN_MODEL].to_torch_state_dict())
    batches = image_batches(score_images(target), config.job.batch_size)
    scores = label_free_scores(candidate, own, batches, seed=config.run.seed)
    return RecordDict({"scores": MetricRecord(scores), "info": ConfigRecord({"domain": config.job.domain})})


def handle_query(received: RecordDict, context: Context) -> RecordDict:
    config = _site_config(context)
    phase = str(_config(received).get("phase", "recalibrate"))
    if phase.startswith("secagg-"):
        return _secure_query(received, context, config, phase)
    target = _dataset(config.data)
    if phase == "census":
        return census_records(len(target), config.job.domain)
    if phase == "score":
        return _score_candidate(received, context, config, target)
    model = _global_model(received, config)
    mode = str(_config(received).get("bn-mode", "batch"))
    sums = recalibration_sums(model, target, config.job.batch_size, mode, _device(config))
    return sums_to_records(sums, len(target), config.job.domain)
