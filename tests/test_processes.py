"""Processes: a stopped ``fedmerge simulate`` leaves nothing running (SuperLink, flwr run, SuperExec, Ray).

A run that ends normally is checked the same way on tests/test_simulation.py's own run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flower_processes import command_lines, flower_processes

pytestmark = pytest.mark.slow

FEDMERGE = Path(sys.executable).parent / "fedmerge"


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_simulation_leaves_no_process_running(tmp_path, sig):
    started = time.time() - 1
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [str(FEDMERGE), "simulate", "--preset", "tiny", "--out-dir", str(out), "--quiet",
         "--set", "method=tent", "--set", "method-options=steps=5000"],  # long enough to be still running when stopped
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def running(word: str) -> bool:
        return any(word in " ".join(p.info["cmdline"] or []) for p in flower_processes(started))

    # mid-run: the run has been submitted and the simulation runtime (ServerApp, ClientApps) is up
    assert _wait_for(lambda: running("flwr-simulation") or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(2)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert _wait_for(lambda: not flower_processes(started), 30), command_lines(flower_processes(started))
    assert proc.returncode != 0
