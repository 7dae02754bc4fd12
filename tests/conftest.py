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


@pytest.fixture(scope="session")
def tiny_source():
    """Eight labeled synthetic source images of 32x48."""
    from common.data import DataSpec, build_dataset

    return build_dataset(DataSpec(kind="synthetic", domain="source", num_images=8, size=(32, 48)))


@pytest.fixture(scope="session")
def tiny_pretrained_state(tiny_source) -> dict[str, torch.Tensor]:
    """A briefly pretrained tiny U-Net (9 classes): its predictions carry signal to adapt, or to destroy."""
    from common.models.factory import build_model
    from common.training.pretrain import PretrainConfig, train_segmenter

    torch.manual_seed(0)
    model = build_model("tiny_unet", 9)
    config = PretrainConfig(arch="tiny_unet", steps=40, batch_size=8, lr=1e-2, progress=False)
    train_segmenter(model, tiny_source, config)
    return {k: v.clone() for k, v in model.state_dict().items()}
