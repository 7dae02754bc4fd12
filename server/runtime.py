"""Drive a real Flower runtime: SuperLink and SuperNode processes, ``flwr run``, teardown by PID.

``fedmerge simulate``, the deployment tests and the experiments all go through here, so
every run uses Flower's own runtime and nothing is left running afterwards: each
process we start is stopped by its PID, and Flower's state lives in a private FLWR_HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil
import tomli_w

from common.config.run import app_pyproject

__all__ = [
    "PROJECT_ROOT",
    "FlowerEnv",
    "Process",
    "format_node_config",
    "free_port",
    "simulation_env",
    "stop_on_sigterm",
    "wait_for_port",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
NodeConfigValue = str | int | float | bool


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with code {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Process:
    """A child process we started, stopped with all its descendants by PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[psutil.Process]:
        """The process, its descendants (Flower detaches its SuperExec) and every process left in its session.

        Each process is started in a session of its own, so children it orphaned (a SuperNode
        stopped mid-round leaves its ClientApp running) are still found after it exits.
        """
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.popen.pid)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if proc.pid not in found and os.getsid(proc.pid) == self.popen.pid:
                    found[proc.pid] = proc
        return [p for p in found.values() if _alive(p)]

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process and every descendant: SIGTERM, then SIGKILL after ``grace`` seconds."""
        procs = self.tree()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if _alive(p)]
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            psutil.wait_procs(alive, timeout=wait)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class FlowerEnv:
    """A private FLWR_HOME plus the processes started in it; use as a context manager."""

    home: Path
    processes: list[Process] = field(default_factory=list)
    # connection name -> Flower's simulation settings, passed to every ``flwr run`` on it
    simulation_configs: dict[str, dict[str, object]] = field(default_factory=dict)
    _previous_handler: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def env(self, home: Path | None = None) -> dict[str, str]:
        """The environment of every Flower process; ``home`` gives a SuperNode its own FLWR_HOME."""
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(home or self.home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PATH": f"{_BIN}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")])),
                "PYTHONUNBUFFERED": "1",
                # Ray's coming default (it warns on every simulation until it is set): an actor
                # asking for no GPU keeps the devices it sees; one that reserves a share (the run
                # config's num-gpus) sees only the GPU Ray gave it, as cuda:0.
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            }
        )
        return env

    def spawn(self, name: str, args: Sequence[str], home: Path | None = None) -> Process:
        """Start ``args`` in its own session, logging to ``<home>/<name>.log``, cwd and FLWR_HOME ``home``."""
        home = home or self.home
        log_path = home / f"{name}.log"
        with log_path.open("w") as log:
            popen = subprocess.Popen(
                [str(_BIN / args[0]), *args[1:]],
                env=self.env(home),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=home,
            )
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def superlink(
        self, *, simulation: bool, tls: Mapping[str, Path] | None = None, auth: bool = False
    ) -> tuple[Process, int]:
        """Start ``flower-superlink``; one port serves the Fleet, Control and Runtime APIs."""
        port = free_port()
        args = [
            "flower-superlink",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--database", str(self.home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if simulation:
            args.append("--simulation")
        if tls is None:
            args.append("--insecure")
        else:
            args += [
                "--ssl-ca-certfile",
                str(tls["ca"]),
                "--ssl-certfile",
                str(tls["cert"]),
                "--ssl-keyfile",
                str(tls["key"]),
            ]
        if auth:
            args.append("--enable-supernode-auth")
        proc = self.spawn("superlink", args)
        wait_for_port(port, 60, proc.popen)
        return proc, port

    def write_connection(
        self,
        name: str,
        control_port: int,
        *,
        root_cert: Path | None = None,
        simulation: Mapping[str, object] | None = None,
    ) -> None:
        """Add a ``[superlink.<name>]`` entry to this home's config.toml.

        ``simulation`` (see :func:`simulation_config`) goes to ``flwr run --federation-config``:
        Flower 1.41 deprecates ``options.`` entries in the connection and warns on every run.
        """
        path = self.home / "config.toml"
        config = {"superlink": {"default": name}}
        if path.exists():
            import tomllib

            config = tomllib.loads(path.read_text())
        entry: dict[str, object] = {"address": f"127.0.0.1:{control_port}"}
        if root_cert is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(root_cert)
        config.setdefault("superlink", {})[name] = entry
        path.write_text(tomli_w.dumps(config))
        if simulation is not None:
            self.simulation_configs[name] = dict(simulation)

    def supernode(
        self,
        name: str,
        superlink_port: int,
        node_config: Mapping[str, NodeConfigValue],
        *,
        root_cert: Path | None = None,
        auth_key: Path | None = None,
    ) -> Process:
        """Start ``flower-supernode`` with its own FLWR_HOME and ClientApp port; TLS when ``root_cert``."""
        home = self.home / "supernodes" / name
        home.mkdir(parents=True, exist_ok=True)
        args = [
            "flower-supernode",
            "--superlink", f"127.0.0.1:{superlink_port}",
            "--port", str(free_port()),
            "--node-config", format_node_config(node_config),
        ]  # fmt: skip
        args += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        return self.spawn(name, args, home)

    def register_supernode(self, public_key: Path, connection: str, name: str = "") -> int:
        """``flwr supernode register``: allow this key to connect; returns the node id it will get."""
        args = ["supernode", "register", str(public_key), connection, "--format", "json"]
        log_name = f"register-{public_key.stem}"
        result = self.flwr([*args, *(["--name", name] if name else [])], timeout=60, log_name=log_name)
        reply = _json_tail(result)
        if result.returncode != 0 or not reply.get("success"):
            raise RuntimeError(f"registering {public_key} failed: {(result.stdout + result.stderr).strip()[-500:]}")
        return int(reply["node-id"])

    def unregister_supernode(self, node_id: int, connection: str) -> None:
        """``flwr supernode unregister``: the key may no longer connect, and runs stop counting the node."""
        args = ["supernode", "unregister", str(node_id), connection]
        result = self.flwr(args, timeout=60, log_name=f"unregister-{node_id}")
        if result.returncode != 0:
            raise RuntimeError(f"unregistering node {node_id} failed: {(result.stdout + result.stderr).strip()[-500:]}")

    def supernodes(self, connection: str) -> list[dict[str, object]]:
        """``flwr supernode list --format json``: the nodes the SuperLink knows, with their status."""
        result = self.flwr(["supernode", "list", connection, "--format", "json"], timeout=60, log_name="list")
        return list(_json_tail(result).get("nodes", []))

    def wait_for_supernodes(self, connection: str, node_ids: Sequence[int], timeout: float = 60) -> None:
        """Block until every node in ``node_ids`` is online: a run only reaches nodes connected at its start."""
        deadline = time.monotonic() + timeout
        while True:
            online = {int(n["node-id"]) for n in self.supernodes(connection) if n.get("status") == "online"}
            if set(node_ids) <= online:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNodes {sorted(set(node_ids) - online)} not online after {timeout:.0f}s")
            time.sleep(0.5)

    def flwr(
        self, args: Sequence[str], timeout: float, log_name: str = "flwr", echo: TextIO | None = None
    ) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command to completion; its output is kept in ``<log_name>.log``.

        With ``echo``, every output line is also written there as it arrives (stdout and
        stderr interleaved, all in ``stdout`` of the result), so a long run shows progress.
        """
        if echo is not None:
            return self._flwr_streaming(args, timeout, self.home / f"{log_name}.log", echo)
        result = subprocess.run(
            [str(_BIN / "flwr"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
        )
        (self.home / f"{log_name}.log").write_text(result.stdout + result.stderr)
        return result

    def _flwr_streaming(
        self, args: Sequence[str], timeout: float, log_path: Path, echo: TextIO
    ) -> subprocess.CompletedProcess:
        command = [str(_BIN / "flwr"), *args]
        lines: list[str] = []
        with (
            log_path.open("w") as log_file,
            subprocess.Popen(
                command, env=self.env(), cwd=self.home, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            ) as proc,
        ):  # fmt: skip
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    log_file.write(line)
                    log_file.flush()
                    echo.write(line)
                    echo.flush()
                returncode = proc.wait()
            except BaseException:  # a stop signal or Ctrl-C: flwr run goes first, then the context stops the rest
                proc.kill()
                raise
            finally:
                timed_out = not timer.is_alive()
                timer.cancel()
        if timed_out:
            raise subprocess.TimeoutExpired(command, timeout, output="".join(lines))
        return subprocess.CompletedProcess(command, returncode, "".join(lines), "")

    def run_app(
        self,
        connection: str,
        run_config: Mapping[str, object],
        timeout: float,
        app_dir: Path = PROJECT_ROOT,
        echo: TextIO | None = None,
    ) -> subprocess.CompletedProcess:
        """``flwr run APP CONNECTION --run-config FILE --stream``, waiting for the run to end.

        This project is run from a slim copy of its packages: ``flwr run`` walks every file
        under the app folder before filtering, and a virtual environment inside it costs
        seconds per run.
        """
        config_file = self.home / "run-config.toml"
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        if app_dir == PROJECT_ROOT:
            app_dir = stage_app(PROJECT_ROOT, self.home / "app")
        args = ["run", str(app_dir), connection, "--run-config", str(config_file), "--stream"]
        if connection in self.simulation_configs:
            federation_file = self.home / "federation-config.toml"
            federation_file.write_text(tomli_w.dumps(self.simulation_configs[connection]))
            args += ["--federation-config", str(federation_file)]
        return self.flwr(args, timeout, "run", echo)

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in reversed(self.processes):
            proc.stop(grace)
        self.processes.clear()

    def __enter__(self) -> FlowerEnv:
        self._previous_handler = stop_on_sigterm()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> signal.Handlers | Callable | int | None:
    """Turn SIGTERM into SystemExit in this process, so ``with`` blocks stop what they started.

    Python's default is to die at once, leaving every child process running. Returns the
    previous handler (None when not on the main thread, where handlers cannot be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _exit_on_sigterm)


def format_node_config(config: Mapping[str, NodeConfigValue]) -> str:
    """``key="value" n=3`` as ``--node-config`` parses it (TOML values, space separated)."""
    items = []
    for key, value in config.items():
        if isinstance(value, str) and ('"' in value or "\\" in value):
            raise ValueError(f"node config {key}: quotes and backslashes cannot pass --node-config: {value!r}")
        items.append(f"{key}={tomli_w.dumps({'v': value}).split('=', 1)[1].strip()}")
    return " ".join(items)


def _json_tail(result: subprocess.CompletedProcess) -> dict:
    """The JSON object ``flwr ... --format json`` prints last (log lines may come before it)."""
    text = result.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


APP_PACKAGES = ("server", "clients", "common")  # what the ServerApp and ClientApp import
APP_FILES = ("*.py", "*.toml")


def stage_app(project: Path, dest: Path) -> Path:
    """A copy of the app's own files (``pyproject.toml`` and the packages the apps import) in ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(app_pyproject(), dest / "pyproject.toml")
    for package in APP_PACKAGES:
        for pattern in APP_FILES:
            for path in (project / package).rglob(pattern):
                if "__pycache__" in path.parts:
                    continue
                target = dest / path.relative_to(project)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return dest


# Once ``flwr run`` has returned, the ServerApp has written its results and the run's status is
# reported: what is left is Flower's processes exiting. The simulation process then spends about
# 1.5 s in interpreter finalization with torch loaded (py-spy shows no Python frame), which a
# SIGTERM does not shorten, so it gets SIGKILL after this grace.
FINISHED_RUN_GRACE = 0.5


def simulation_config(num_supernodes: int, num_gpus: float = 0.0) -> dict[str, object]:
    """Flower's simulation settings for this machine: one CPU per site's actor, so sites run side by side
    (Flower's default of 2 CPUs each runs them one at a time on 2 cores), ``num_gpus`` of a GPU each (the
    run config's ``num-gpus``: how many sites Ray lets share one GPU at once), and a quiet Ray.

    The keys are those of ``flwr run --federation-config`` (Flower's ``SimulationConfig``).
    """
    return {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": float(num_gpus),
        "init-args-logging-level": "ERROR",
        "init-args-log-to-driver": False,
    }


@contextlib.contextmanager
def simulation_env(home: Path, num_supernodes: int, num_gpus: float = 0.0) -> Iterator[tuple[FlowerEnv, str]]:
    """A SuperLink in simulation mode with a ``sim`` connection of ``num_supernodes`` nodes, ``num_gpus`` GPU each."""
    with FlowerEnv(home) as env:
        _, port = env.superlink(simulation=True)
        env.write_connection("sim", port, simulation=simulation_config(num_supernodes, num_gpus))
        yield env, "sim"
        env.stop_all(grace=FINISHED_RUN_GRACE)  # a run that ended normally; any other ending keeps the full grace
