"""The processes of a Flower deployment on this machine: a SuperLink with TLS and SuperNode
authentication, and SuperNodes, each started in its own process group with its PID written under the
deployment folder, so that `stop` ends each with everything it started (SuperExec, ServerApp and
ClientApp processes) and nothing is left running.

Layout of the folder: certs/ (fedemb.deploy.credentials), keys/NAME[.pub], logs/NAME.log,
pids/NAME.pid, flwr-home/config.toml (the `flwr` CLI's connection), state.db (the SuperLink's state,
so registrations survive a restart).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedemb.deploy.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from fedemb.errors import FedembError
from fedemb.flower_cli_run import flwr_command, submit_run, wait_for_final_status

CONNECTION = "fedemb"
SUPERLINK = "superlink"


def flower_executable(name: str) -> str:
    """The Flower console script installed next to this Python (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if not candidate.is_file():
        raise FedembError(f"{name} not found next to {sys.executable}: install flwr into this environment")
    return str(candidate)


@dataclass
class Deployment:
    folder: Path
    port: int = 9092  # the SuperLink's one port: Fleet, Control and Runtime APIs
    host: str = "127.0.0.1"
    _children: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)  # to reap what we started

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    def env(self) -> dict[str, str]:
        """Offline-safe, with this environment's scripts first on PATH: the SuperLink and SuperNodes start
        `flower-superexec` and the apps by name."""
        scripts = str(Path(sys.executable).parent)
        return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                    FLWR_HOME=str(self.path("flwr-home")),
                    PATH=os.pathsep.join([scripts, os.environ.get("PATH", "")]))

    def write_connection(self) -> Path:
        """The `flwr` CLI's connection to this SuperLink: `flwr run . fedemb`, `flwr supernode ... fedemb`."""
        config = self.path("flwr-home", "config.toml")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                          f'address = "{self.address}"\nroot-certificates = "{self.path("certs", CA_CERT).resolve()}"\n')
        return config

    def _start(self, name: str, argv: list[str], cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> int:
        for folder in ("logs", "pids"):
            self.path(folder).mkdir(parents=True, exist_ok=True)
        with open(self.path("logs", f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env() | (extra_env or {}),
                                    cwd=cwd, start_new_session=True)
        self.path("pids", f"{name}.pid").write_text(str(proc.pid))
        self._children[name] = proc
        return proc.pid

    def start_superlink(self, authenticate_nodes: bool = True, timeout: float = 60.0) -> int:
        certs = self.path("certs")
        argv = [flower_executable("flower-superlink"), "--ssl-ca-certfile", str(certs / CA_CERT),
                "--ssl-certfile", str(certs / SERVER_CERT), "--ssl-keyfile", str(certs / SERVER_KEY),
                "--port", str(self.port), "--database", str(self.path("state.db"))]
        if authenticate_nodes:
            argv.append("--enable-supernode-auth")
        self.write_connection()
        pid = self._start(SUPERLINK, argv, cwd=self.folder)
        wait_for_port(self.host, self.port, timeout, lambda: self.alive(SUPERLINK),
                      self.path("logs", f"{SUPERLINK}.log"))
        return pid

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([flower_executable("flwr"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key; returns its node id."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json")
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            raise FedembError(f"registering {name} failed: {(done.stdout + done.stderr).strip()[-300:]}")
        return int(reply["node-id"])

    def supernodes(self) -> list[dict]:
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise FedembError(f"flwr supernode list failed: {(done.stdout + done.stderr).strip()[-300:]}")
        reply = json.loads(done.stdout)
        return reply.get("nodes", reply) if isinstance(reply, dict) else reply

    def start_supernode(self, name: str, private_key: Path, port: int, node_config: str = "",
                        extra_env: dict[str, str] | None = None) -> int:
        """A SuperNode (and the ClientApps it starts) in its own process group; `extra_env` is added to the
        environment it and its ClientApps run in."""
        argv = [flower_executable("flower-supernode"), "--superlink", self.address,
                "--root-certificates", str(self.path("certs", CA_CERT)),
                "--auth-supernode-private-key", str(private_key), "--port", str(port)]
        if node_config:
            argv += ["--node-config", node_config]
        return self._start(name, argv, cwd=self.folder, extra_env=extra_env)

    def submit_run(self, app_dir: Path, run_config: dict[str, str]) -> str:
        """`flwr run APP_DIR fedemb`: the app goes to the SuperLink, which runs its ServerApp; the run id."""
        return submit_run(app_dir.resolve(), [CONNECTION], run_config, self.env())

    def wait_for_run(self, run_id: str, timeout_s: float, results_file: Path | None = None) -> str:
        """The run's final status (`finished:completed`, `finished:failed`, ...) once it has one; Flower's
        `flwr run --stream` exits 0 even when a run failed, so this asks the SuperLink."""
        return wait_for_final_status(run_id, self.env(), self.folder, timeout_s, 1.0, results_file)

    def run_log(self, run_id: str) -> str:
        return flwr_command(["flwr", "log", run_id, CONNECTION, "--show"], self.env(), self.folder, 60).stdout

    def pid(self, name: str) -> int | None:
        file = self.path("pids", f"{name}.pid")
        return int(file.read_text()) if file.is_file() else None

    def alive(self, name: str) -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not _is_zombie(pid)

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM to the process group (a SuperNode deregisters, a SuperLink stops its SuperExec), then
        SIGKILL to whatever of the group is left after `grace` seconds."""
        pid = self.pid(name)
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.2)
            if not _group_alive(pid):
                break
        child = self._children.pop(name, None)
        if child is not None:
            child.wait(timeout=5)
        self.path("pids", f"{name}.pid").unlink(missing_ok=True)

    def stop_all(self) -> None:
        """Nodes first, then the SuperLink."""
        names = sorted(p.stem for p in self.path("pids").glob("*.pid")) if self.path("pids").is_dir() else []
        for name in [n for n in names if n != SUPERLINK] + [n for n in names if n == SUPERLINK]:
            self.stop(name)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(")")[-1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float, alive, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            tail = log.read_text()[-500:] if log.is_file() else ""
            raise FedembError(f"the SuperLink exited during start-up; its log ends: {tail.strip()}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FedembError(f"the SuperLink did not open {host}:{port} within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
