"""Which Flower or Ray processes are alive: what a run would leave behind."""

from __future__ import annotations

import os

import psutil

FLOWER_WORDS = ("flwr", "flower", "ray", "raylet", "gcs_server")


def flower_processes(since: float) -> list[psutil.Process]:
    """Processes started since ``since`` (a ``time.time()``) that belong to Flower or Ray."""
    found = []
    for proc in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
        info = proc.info
        if info["create_time"] < since or info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        line = " ".join(info["cmdline"] or []).lower()
        if any(word in line for word in FLOWER_WORDS):
            found.append(proc)
    return found


def command_lines(procs: list[psutil.Process]) -> list[str]:
    return [" ".join(p.info["cmdline"] or [])[:200] for p in procs]
