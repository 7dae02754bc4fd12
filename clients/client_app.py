"""The Flower ClientApp: each message type of the protocol routed to the site's answer in ``clients.handlers``.

A site's configuration is read once per run (``clients.config``) and kept in this worker
for every later message; in simulation one worker may serve several sites, each with its own.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import handlers
from clients.config import SiteConfig
from common.updates.wire import Action

__all__ = ["ACTIONS", "app", "handle", "site_config"]

Handler = Callable[[RecordDict, SiteConfig, Context], RecordDict]
ACTIONS: dict[str, Handler] = {
    Action.ADAPT: handlers.adapt,
    Action.CENSUS: handlers.census,
    Action.SCORE: handlers.score,
    Action.RECALIBRATE: handlers.recalibrate,
    Action.EVALUATE: handlers.evaluate,
    Action.SECAGG_ADVERTISE: handlers.secagg_advertise,
    Action.SECAGG_SHARE_KEYS: handlers.secagg_share_keys,
    Action.SECAGG_MASKED_INPUT: handlers.secagg_masked_input,
    Action.SECAGG_UNMASK: handlers.secagg_unmask,
}
_SITES: dict[tuple, SiteConfig] = {}  # (run, node, its configs) -> the site's configuration, read once


def site_config(context: Context) -> SiteConfig:
    """This site's configuration for this run, built on its first message."""
    key = (context.run_id, context.node_id, tuple(sorted(context.run_config.items())),
           tuple(sorted(context.node_config.items())))  # fmt: skip
    if key not in _SITES:
        _SITES[key] = SiteConfig.from_flower(context.run_config, context.node_config)
    return _SITES[key]


def handle(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """The site's answer to one message (what Flower's routing below calls, and what tests call in process)."""
    return ACTIONS[message_type](content, site_config(context), context)


app = ClientApp()


def _register(message_type: str) -> None:
    category, _, action = message_type.partition(".")
    decorate = getattr(app, category)(action) if action else getattr(app, category)()

    @decorate
    def reply(msg: Message, context: Context) -> Message:
        return Message(content=handle(message_type, msg.content, context), reply_to=msg)


for _message_type in ACTIONS:
    _register(_message_type)
