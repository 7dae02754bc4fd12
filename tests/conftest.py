"""Shared fixtures: tiny synthetic data so every test runs in seconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_target():
    from common.data import DataSpec, build_dataset

    return build_dataset(DataSpec(kind="synthetic", domain="fog", num_images=6, size=(32, 48)))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core box it costs ~8x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
