"""An installed wheel is a whole app: defaults, presets and the Flower app travel in the package itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "common", "clients", "server", "experiments", "fedmerge")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_a_wheel_installed_into_another_folder_runs_a_simulation_from_anywhere(tmp_path):
    src = tmp_path / "src"  # a clean copy: an in-tree build would leave build/ and egg-info in the project
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        copy(path, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if path.is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
         src)  # fmt: skip
    [wheel] = tmp_path.glob("fedmerge-*.whl")
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], tmp_path)
    assert (target / "common" / "config" / "app-pyproject.toml").is_file()
    assert not (target / "pyproject.toml").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of this checkout's editable install
    where = _run([sys.executable, "-c", "import common.config.run as r; print(r.app_pyproject())"], elsewhere, env)
    assert where.stdout.strip() == str(target / "common" / "config" / "app-pyproject.toml")
    out = tmp_path / "run"
    _run([sys.executable, "-m", "fedmerge", "simulate", "--preset", "tiny", "--out-dir", str(out), "--quiet"],
         elsewhere, env)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and len(report["sites"]) == 3
