"""The Flower ClientApp: load the global model, adapt locally, reply with the update.

Only parameters, BN buffers, counts, the domain name, the method and unsupervised
scalars leave the site (see ``common.wire``); images and labels never do.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.config import SiteConfig
from clients.site import adapt_site, recalibration_sums
from common.data import build_dataset
from common.fingerprint import INITIAL_SHA256, state_fingerprint
from common.model_factory import build_model
from common.models import Segmenter
from common.wire import census_records, sums_to_records, update_to_records

app = ClientApp()


def _site_config(context: Context) -> SiteConfig:
    return SiteConfig.from_flower(context.run_config, context.node_config)


def _global_model(msg: Message, config: SiteConfig) -> Segmenter:
    model = build_model(config.arch, config.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return model


def _initial_model(msg: Message, config: SiteConfig) -> Segmenter:
    """The run's starting model; a site holding the shared weights locally uses its copy, if it is the same model.

    The server always sends the initial model's fingerprint, and with ``send-initial-weights
    = false`` no arrays at all: a site then needs node config ``weights`` = a local file.
    """
    sent = msg.content["arrays"]
    if not config.weights:
        if len(sent) == 0:
            raise ValueError(
                "the server sent no initial weights (send-initial-weights = false) and this site's node config "
                "names no local 'weights' file"
            )
        return _global_model(msg, config)
    model = build_model(config.arch, config.num_classes, weights=config.weights)
    expected = str(msg.content["config"].get(INITIAL_SHA256, "")) if "config" in msg.content else ""
    if not expected and len(sent) > 0:
        expected = state_fingerprint(sent.to_torch_state_dict())
    local = state_fingerprint(model.state_dict())
    if local != expected:
        raise ValueError(
            f"local weights {config.weights} (sha256 {local[:16]}) are not the run's initial model "
            f"(sha256 {expected[:16] or 'unknown'})"
        )
    return model


def round_seed(msg: Message, seed: int) -> int:
    """The adaptation seed of this round: ``seed`` in round 1 (the one-shot merge), then seed + round - 1.

    A multi-round run (FedAvg) must not replay the same batches and augmentations every round.
    """
    server_round = int(msg.content["config"].get("server-round", 1)) if "config" in msg.content else 1
    return seed + max(server_round, 1) - 1


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _site_config(context)
    config.job.context.seed = round_seed(msg, config.job.context.seed)
    model = _initial_model(msg, config)
    if config.source is not None:
        config.job.context.source = build_dataset(config.source)
    update = adapt_site(model, build_dataset(config.data), config.job)
    return Message(content=update_to_records(update, config.job.method), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The light rounds: a census (the number of images) or recalibration (BN sums); scalars and sums only."""
    config = _site_config(context)
    target = build_dataset(config.data)
    phase = str(msg.content["config"].get("phase", "recalibrate")) if "config" in msg.content else "recalibrate"
    if phase == "census":
        return Message(content=census_records(len(target), config.job.domain), reply_to=msg)
    model = _global_model(msg, config)
    mode = str(msg.content["config"].get("bn-mode", "batch")) if "config" in msg.content else "batch"
    sums = recalibration_sums(model, target, config.job.batch_size, mode)
    return Message(content=sums_to_records(sums, len(target), config.job.domain), reply_to=msg)
