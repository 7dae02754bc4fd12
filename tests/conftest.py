"""Shared fixtures: tiny synthetic data so every test runs in seconds, and the same start for every test.

Results of training and sampling differ between one and two torch threads, and with whatever a
previous test drew from the global generators. So every test (and every module fixture built
between two tests) runs on one thread from seeded global generators, whatever OMP_NUM_THREADS
says and whatever order the files run in. Processes a test starts (Flower) choose their own.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

TEST_THREADS = 1  # tiny models gain nothing from a second thread, and on a busy 2-core box it costs ~8x
TEST_SEED = 0


def _fresh_start() -> None:
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    random.seed(TEST_SEED)


def pytest_configure(config: pytest.Config) -> None:
    _fresh_start()


@pytest.fixture(autouse=True)
def _same_start_for_every_test():
    """Seeded before the test and again after it, so the next module's fixtures start seeded too."""
    _fresh_start()
    yield
    _fresh_start()


@pytest.fixture(scope="session")
def tiny_target():
    from common.data import DataSpec, build_dataset

    return build_dataset(DataSpec(kind="synthetic", domain="fog", num_images=6, size=(32, 48)))
