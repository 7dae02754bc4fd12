"""``flwr run .`` as README shows it, from a clean Flower home: it completes with the declared defaults."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.runtime import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _readme_command() -> list[str]:
    """The README's own line, so the test fails when the README changes and the code does not."""
    text = (PROJECT_ROOT / "README.md").read_text()
    match = re.search(r"^(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run \. --stream)$", text, re.M)
    assert match, "README shows how to run the app with flwr run"
    return match.group(1).split()


def _stop_local_superlink(home: Path, since: float) -> None:
    """Flower keeps its local SuperLink (and SuperExec) running for the next run; this test's are stopped."""
    for proc in psutil.process_iter(["create_time", "cmdline"]):
        try:
            if proc.info["create_time"] >= since and proc.environ().get("FLWR_HOME") == str(home):
                proc.kill()
        except (psutil.Error, OSError):
            continue


def test_flwr_run_with_the_declared_defaults_writes_the_merge_and_the_report(tmp_path):
    env_assignment, *command = _readme_command()
    key, _, value = env_assignment.partition("=")
    home = tmp_path / "flwr-home"
    env = {**os.environ, key: value, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    started = time.time() - 1
    out_dir = None
    try:
        result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
        found = re.search(r"results go to (\S+)", result.stdout + result.stderr)
        assert found, (result.stdout + result.stderr)[-3000:]
        out_dir = Path(found.group(1))
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert out_dir.is_absolute() and (out_dir / "merged.safetensors").is_file()
        assert (out_dir / "report.json").is_file()
    finally:
        _stop_local_superlink(home, started)
        if out_dir is not None and out_dir.parent == PROJECT_ROOT / "runs":
            shutil.rmtree(out_dir, ignore_errors=True)
