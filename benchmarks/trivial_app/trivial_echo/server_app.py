"""One round of Flower's FedAvg over echoing ClientApps, timestamps written to ``out-file``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

import numpy as np
import psutil
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from trivial_echo import TORCH_SWITCH

if os.environ.get(TORCH_SWITCH) == "1":  # the same app, paying what any torch app pays to start
    import torch  # noqa: F401

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each reply reached the server and what the ClientApp said of its time."""

    def __init__(self, min_nodes: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=min_nodes)
        self.timing: dict = {"sites": []}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        self.timing["train-round-started-at"] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        received = time.time()
        for reply in replies:
            self.timing["sites"].append({**dict(reply.content["metrics"]), "server-received-at": received})
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    strategy = TimedFedAvg(int(context.run_config["min-nodes"]))
    arrays = ArrayRecord([np.zeros((64, 64), dtype=np.float32)])
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    timing = {**strategy.timing, "serverapp-started-at": started, "serverapp-finished-at": time.time(),
              "serverapp-startup-seconds": started - psutil.Process().create_time()}  # fmt: skip
    with open(str(context.run_config["out-file"]), "w") as f:
        json.dump(timing, f)
