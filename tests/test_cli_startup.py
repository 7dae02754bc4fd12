"""The command line answers at once: help and usage errors import neither torch nor Flower."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from fedmerge.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'torchvision', 'flwr'}})
print('HEAVY', heavy)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["merge"],
        ["merge", "--help"],
        ["simulate", "--help"],
        ["compare", "--help"],
        ["evaluate"],
        ["adapt", "--list"],
        ["import-weights", "--help"],
        ["import-weights", "mit"],
        [
            "adapt",
            "--method",
            "hrda",
            "--set",
            "stesp=3",
            "--model",
            "m.safetensors",
            "--data",
            "synthetic",
            "--out",
            "o.safetensors",
        ],
    ],
)
def test_help_usage_errors_and_option_checks_import_neither_torch_nor_flower(argv):
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert "HEAVY []" in result.stdout, (result.stdout, result.stderr[-2000:])


def test_a_clientapp_worker_starts_without_torchvision():
    """torchvision's import is ~3 s of every simulated worker's start-up; only a transform needs it."""
    probe = (
        "import sys, clients.client_app, server.server_app\n"
        "from common.data import DataSpec, build_dataset\n"
        "build_dataset(DataSpec.parse('synthetic?domain=fog&n=2&size=32x48'))[0]\n"
        "print('TORCHVISION', 'torchvision' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "TORCHVISION False" in result.stdout, (result.stdout, result.stderr[-2000:])
