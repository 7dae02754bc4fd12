"""Echo the arrays back, with the timestamps the overhead benchmark needs."""

from __future__ import annotations

import os
import time

import psutil
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from trivial_echo import TORCH_SWITCH

if os.environ.get(TORCH_SWITCH) == "1":  # the same app, paying what any torch app pays to start
    import torch  # noqa: F401

STARTUP_SECONDS = time.time() - psutil.Process().create_time()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    metrics = MetricRecord({"num-examples": 1, "clientapp-started-at": started, "clientapp-startup-seconds":
                            STARTUP_SECONDS, "clientapp-replied-at": time.time()})  # fmt: skip
    return Message(content=RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)
