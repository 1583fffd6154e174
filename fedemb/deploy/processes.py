"""The server's processes of a Flower deployment: the SuperLink with TLS and SuperNode authentication,
started in its own process group with its PID under the deployment folder, so that `stop` ends it with
everything it started (SuperExec, ServerApp) and nothing is left running; registering devices' keys;
submitting a run and waiting for its final status. The devices' side is fedemb.deploy.device_node.

Layout of the folder: certs/ (fedemb.deploy.credentials), keys/NAME.pub and keys/registry.json
(fedemb.deploy.registry), logs/NAME.log, pids/NAME.pid, superlink.json (the address it was started
with), flwr-home/config.toml (the `flwr` CLI's connection), state.db (the SuperLink's state, so
registrations survive a restart).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedemb.deploy.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, certificate_hosts
from fedemb.deploy.registry import NodeRegistry, read_public_key
from fedemb.errors import FedembError
from fedemb.flower_cli_run import flwr_command, submit_run, wait_for_final_status
from fedemb.os_processes import alive, read_pid, start_detached, stop_group

CONNECTION = "fedemb"
SUPERLINK = "superlink"
SETTINGS = "superlink.json"  # the address the SuperLink was started with, for the later commands


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
    host: str = "127.0.0.1"  # the address devices and the `flwr` CLI dial; the certificate must cover it
    bind: str = ""  # the address the SuperLink listens on ("": host; "0.0.0.0": every interface)
    _children: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)  # to reap what we started

    @classmethod
    def open(cls, folder: Path, port: int | None = None, host: str | None = None) -> "Deployment":
        """The deployment of `folder` with the address its SuperLink was started with (superlink.json),
        unless `port`/`host` say otherwise."""
        saved = {}
        if (folder / SETTINGS).is_file():
            saved = json.loads((folder / SETTINGS).read_text())
        return cls(folder, port or int(saved.get("port", 9092)), host or saved.get("host", "127.0.0.1"),
                   saved.get("bind", ""))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def listen_address(self) -> str:
        return f"{self.bind or self.host}:{self.port}"

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
        proc = start_detached(argv, self.path("logs", f"{name}.log"), self.path("pids", f"{name}.pid"),
                              self.env() | (extra_env or {}), cwd)
        self._children[name] = proc
        return proc.pid

    def start_superlink(self, authenticate_nodes: bool = True, timeout: float = 60.0) -> int:
        """Start the SuperLink listening on `listen_address` and wait until `address` answers. Refuses
        when the server certificate does not cover `host`: every device would fail TLS verification."""
        certs = self.path("certs")
        if not (certs / SERVER_CERT).is_file():
            raise FedembError(f"no server certificate in {certs}: run `fedemb deploy credentials` first")
        covered = certificate_hosts(certs / SERVER_CERT)
        if self.host not in covered:
            raise FedembError(f"the certificate {certs / SERVER_CERT} covers {', '.join(covered)}, not {self.host}: "
                              f"devices dialling {self.host} would fail TLS; make credentials with --hosts {self.host}")
        if self.alive(SUPERLINK):
            raise FedembError(f"a SuperLink of {self.folder} already runs (pid {self.pid(SUPERLINK)}): stop it first")
        argv = [flower_executable("flower-superlink"), "--ssl-ca-certfile", str(certs / CA_CERT),
                "--ssl-certfile", str(certs / SERVER_CERT), "--ssl-keyfile", str(certs / SERVER_KEY),
                "--host", self.bind or self.host, "--port", str(self.port), "--database", str(self.path("state.db"))]
        if authenticate_nodes:
            argv.append("--enable-supernode-auth")
        self.write_connection()
        self.path(SETTINGS).write_text(json.dumps({"host": self.host, "port": self.port, "bind": self.bind}))
        pid = self._start(SUPERLINK, argv, cwd=self.folder)
        wait_for_port(self.host, self.port, timeout, lambda: self.alive(SUPERLINK),
                      self.path("logs", f"{SUPERLINK}.log"))
        return pid

    def listening(self) -> list[str]:
        """What the SuperLink's log says it serves, e.g. "Fleet HTTP API on 10.0.0.5:9092"."""
        log = self.path("logs", f"{SUPERLINK}.log")
        text = log.read_text(errors="replace") if log.is_file() else ""
        return re.findall(r"Starting the SuperLink (.+? API on \S+?)\.?$", text, flags=re.M)

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

    def register_device(self, public_key: Path, name: str | None = None) -> tuple[str, int, bool]:
        """Register a device's public key under its name (the key's comment unless `name`); keeps
        keys/NAME.pub and the name in keys/registry.json. Returns (name, node id, registered before)."""
        key = read_public_key(public_key, name)
        registry = NodeRegistry(self.path("keys"))
        conflict = registry.conflict(key)
        if conflict:
            raise FedembError(f"{public_key}: {conflict}")
        known = registry.registered(key)
        if known is not None:
            return key.name, known, True
        staged = self.path("keys", f".{key.name}.pub.new")
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(key.text)
        try:
            node_id = self.register(staged, key.name)
        finally:
            staged.unlink(missing_ok=True)
        registry.add(key, node_id)
        return key.name, node_id, False

    def supernodes(self) -> list[dict]:
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise FedembError(f"flwr supernode list failed: {(done.stdout + done.stderr).strip()[-300:]}")
        reply = json.loads(done.stdout)
        return reply.get("nodes", reply) if isinstance(reply, dict) else reply

    def submit_run(self, app_dir: Path, run_config: dict[str, str]) -> str:
        """`flwr run APP_DIR fedemb`: the app goes to the SuperLink, which runs its ServerApp; the run id."""
        return submit_run(app_dir.resolve(), [CONNECTION], run_config, self.env())

    def wait_for_run(self, run_id: str, timeout_s: float, results_file: Path | None = None,
                     while_waiting=None) -> str:
        """The run's final status (`finished:completed`, `finished:failed: ...`) once it has one; Flower's
        `flwr run --stream` exits 0 even when a run failed, so this asks the SuperLink."""
        return wait_for_final_status(run_id, self.env(), self.folder, timeout_s, 1.0, results_file, while_waiting)

    def run_log(self, run_id: str) -> str:
        return flwr_command(["flwr", "log", run_id, CONNECTION, "--show"], self.env(), self.folder, 60).stdout

    def pid(self, name: str) -> int | None:
        return read_pid(self.path("pids", f"{name}.pid"))

    def alive(self, name: str) -> bool:
        return alive(self.pid(name))

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM to the process group (a SuperNode deregisters, a SuperLink stops its SuperExec), then
        SIGKILL to whatever of the group is left after `grace` seconds."""
        pid = self.pid(name)
        if pid is None:
            return
        stop_group(pid, grace)
        child = self._children.pop(name, None)
        if child is not None:
            child.wait(timeout=5)
        self.path("pids", f"{name}.pid").unlink(missing_ok=True)

    def stop_all(self) -> None:
        """Nodes first, then the SuperLink."""
        names = sorted(p.stem for p in self.path("pids").glob("*.pid")) if self.path("pids").is_dir() else []
        for name in [n for n in names if n != SUPERLINK] + [n for n in names if n == SUPERLINK]:
            self.stop(name)


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
