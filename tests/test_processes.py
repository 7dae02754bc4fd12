"""Processes: a stopped ``fedmerge simulate`` leaves nothing running (SuperLink, flwr run, SuperExec, Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

FEDMERGE = Path(sys.executable).parent / "fedmerge"
FLOWER_WORDS = ("flwr", "flower", "ray", "raylet", "gcs_server")


def _flower_processes(since: float) -> list[psutil.Process]:
    """Processes started since ``since`` that belong to Flower or Ray."""
    found = []
    for proc in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
        info = proc.info
        if info["create_time"] < since or info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        line = " ".join(info["cmdline"] or []).lower()
        if any(word in line for word in FLOWER_WORDS):
            found.append(proc)
    return found


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
        [str(FEDMERGE), "simulate", "--preset", "tiny", "--out-dir", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def running(word: str) -> bool:
        return any(word in " ".join(p.info["cmdline"] or []) for p in _flower_processes(started))

    # mid-run: the run has been submitted and the simulation runtime (ServerApp, ClientApps) is up
    assert _wait_for(lambda: running("flwr-simulation") or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(2)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert _wait_for(lambda: not _flower_processes(started), 30), [
        " ".join(p.info["cmdline"] or [])[:200] for p in _flower_processes(started)
    ]
    assert proc.returncode != 0


def test_a_finished_simulation_has_stopped_every_process_when_it_returns(tmp_path):
    """After a normal end the left-over Flower processes get a short grace, then SIGKILL (server.runtime)."""
    started = time.time() - 1
    out = tmp_path / "run"
    result = subprocess.run([str(FEDMERGE), "simulate", "--preset", "tiny", "--out-dir", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "merged.safetensors").is_file() and (out / "report.json").is_file()
    assert not _flower_processes(started), [" ".join(p.info["cmdline"] or [])[:200] for p in _flower_processes(started)]
