"""One device's Flower SuperNode, kept in a device folder so that each command finds what the last left:

    node.key, node.key.pub   its OpenSSH key pair; the public key's comment is the device's name
    device.json              name, superlink, ca, data, user, port, node_id (once the server activated it)
    ca.crt                   the server's CA certificate, copied in at join
    supernode.log            what the SuperNode (and everything it starts) writes
    supernode.pid            its PID, which is also its process group: stop ends everything it started

Joining starts the SuperNode detached and watches its log until the server activates it (Flower logs
`SuperNode ID: N`) or it exits or the wait runs out; a failure is explained from the log in plain words.
Only fedemb's lean modules and base dependencies (psutil for the processes), never torch: a device's
install has no torch to spare.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedemb.deploy.credentials import checked_node_name, make_node_key
from fedemb.deploy.device_data import DATA_PATH, USER, read_device_file
from fedemb.errors import FedembError
from fedemb.os_processes import alive, command_line, group_running, read_pid, start_detached, stop_group

HOME_VARIABLE = "FEDEMB_DEVICE_HOME"
KEY, PUBLIC_KEY, SETTINGS, CA, LOG, PID = "node.key", "node.key.pub", "device.json", "ca.crt", "supernode.log", "supernode.pid"
DEFAULT_PORT = 9094
ACTIVATED = re.compile(r"SuperNode ID: (\d+)")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
LEVEL_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
NOISE = ("Started server process", "Waiting for application", "Application startup complete", "Uvicorn running",
         "Shutting down", "Application shutdown complete", "Finished server process", "FastAPI lifespan",
         "For more information", "Starting Flower SuperNode", "Starting Flower SuperExec", "Traceback (")


def default_folder() -> Path:
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".fedemb-device").expanduser()


@dataclass(frozen=True)
class DeviceFolder:
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def has_key(self) -> bool:
        return self.file(KEY).is_file() and self.file(PUBLIC_KEY).is_file()

    def name(self) -> str:
        """The public key's comment: the name the server registers the key by."""
        if not self.has_key():
            raise FedembError(f"no key in {self.path}: make one with `fedemb-device key --folder {self.path}`")
        fields = self.file(PUBLIC_KEY).read_text().split()
        return fields[2] if len(fields) >= 3 else self.settings().get("name", "")

    def settings(self) -> dict:
        try:
            return json.loads(self.file(SETTINGS).read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise FedembError(f"{self.file(SETTINGS)} is damaged ({exc}): join again to rewrite it") from None

    def save_settings(self, settings: dict) -> None:
        write_atomically(self.file(SETTINGS), (json.dumps(settings, indent=2) + "\n").encode())

    def node_pid(self) -> int | None:
        """The running SuperNode's PID; None when none runs (a PID file left by a crash does not count)."""
        pid = read_pid(self.file(PID))
        return pid if alive(pid) and self._runs_our_node(pid) else None

    def _runs_our_node(self, pid: int) -> bool:
        """Whether `pid` is this folder's SuperNode and not a process that got its PID after a reboot."""
        argv = command_line(pid)
        return any(a.endswith("flower-supernode") for a in argv) and str(self.file(KEY).resolve()) in argv


def write_atomically(path: Path, data: bytes) -> None:
    """Whole or not at all: a temporary file beside `path`, synced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- the key ---------------------------------------------------------------------------------------

def default_name() -> str:
    """<short host name>-<6 random hex digits>: two devices with the same host name still differ."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0]).strip("-._")[:40]
    return f"{host or 'device'}-{secrets.token_hex(3)}"


def make_key(folder: DeviceFolder, name: str | None, force: bool) -> str:
    """The device's key pair under `folder`; its name (the public key's comment)."""
    name = checked_node_name(name) if name is not None else default_name()
    if folder.has_key() and not force:
        raise FedembError(f"{folder.path} already has a key ({folder.name()}): --force replaces it, and the "
                          "server must then register the new one")
    if folder.node_pid() is not None:
        raise FedembError(f"a node runs from {folder.path}: `fedemb-device stop --folder {folder.path}` first")
    folder.path.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".key-", dir=folder.path))
    try:
        private, public = make_node_key(scratch, name)
        folder.save_settings({"name": name})  # a new key is a new node: what joined before no longer applies
        os.replace(public, folder.file(PUBLIC_KEY))
        os.replace(private, folder.file(KEY))  # last: a folder "has a key" only once both halves are in place
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return name


# --- joining ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9._-]+):(\d+)", text.strip())
    port = int(match[2] or match[4]) if match else 0
    if not match or not 1 <= port <= 65535:
        raise FedembError(f"--superlink must be HOST:PORT (like 192.0.2.7:9092 or [2001:db8::7]:9092), got {text!r}")
    return Address(match[1] or match[3], port)


@dataclass(frozen=True)
class JoinRequest:
    superlink: Address
    ca: Path
    data: Path
    user: int | None = None
    port: int = DEFAULT_PORT
    wait: float = 60.0


@dataclass(frozen=True)
class RunningNode:
    process: subprocess.Popen
    log_offset: int  # where this start's lines begin in supernode.log


@dataclass(frozen=True)
class JoinResult:
    name: str
    node_id: int | None  # None: not joined, for `reason`
    reason: str = ""


def check_join(folder: DeviceFolder, request: JoinRequest) -> None:
    """Everything that can be checked before starting a node; a FedembError names what is wrong."""
    folder.name()
    pid = folder.node_pid()
    if pid is not None:
        raise FedembError(f"a node already runs from {folder.path} (pid {pid}): "
                          f"`fedemb-device stop --folder {folder.path}` first")
    check_ca_file(request.ca)
    if "'" in str(request.data.resolve()) or "\n" in str(request.data.resolve()):
        raise FedembError(f"{request.data}: Flower's --node-config cannot quote a path with ' in it: rename it")
    read_device_file(request.data, request.user)
    if not 1 <= request.port <= 65535:
        raise FedembError(f"--port must be 1-65535, got {request.port}")
    if not port_free(request.port):
        raise FedembError(f"port {request.port} on this machine is in use (another node?): give --port another")
    if not request.wait > 0:
        raise FedembError(f"--wait must be a positive number of seconds, got {request.wait}")
    flower_supernode()


def check_ca_file(file: Path) -> None:
    if not file.is_file():
        raise FedembError(f"{file}: no such CA certificate file")
    text = file.read_bytes()
    if b"PRIVATE KEY" in text:
        raise FedembError(f"{file} is a private key: --ca takes the server's CA certificate (ca.crt)")
    try:
        x509.load_pem_x509_certificates(text)
    except ValueError:
        raise FedembError(f"{file} is not a PEM certificate: --ca takes the server's CA certificate (ca.crt)") from None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperNode's own server binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_node(folder: DeviceFolder, request: JoinRequest) -> RunningNode:
    """Check the request, then start the SuperNode detached, in its own process group."""
    check_join(folder, request)
    if request.ca.resolve() != folder.file(CA).resolve():
        write_atomically(folder.file(CA), request.ca.read_bytes())
    folder.save_settings({"name": folder.name(), "superlink": str(request.superlink),
                          "ca": str(folder.file(CA).resolve()), "data": str(request.data.resolve()),
                          "user": request.user, "port": request.port, "node_id": None})
    log = folder.file(LOG)
    offset = log.stat().st_size if log.is_file() else 0
    process = start_detached(supernode_argv(folder, request), log, folder.file(PID), supernode_env(folder),
                             cwd=folder.path)
    return RunningNode(process, offset)


def wait_for_activation(folder: DeviceFolder, request: JoinRequest, node: RunningNode) -> JoinResult:
    """Until the server activates the node, it exits, or `request.wait` runs out; on failure nothing of
    it is left running."""
    name, log = folder.name(), folder.file(LOG)
    deadline = time.monotonic() + request.wait
    try:
        while True:
            exited = node.process.poll() is not None
            text = read_from(log, node.log_offset)
            node_id = activated_node_id(text)
            if node_id is not None and not exited:
                folder.save_settings(folder.settings() | {"node_id": node_id})
                return JoinResult(name, node_id)
            if exited or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except BaseException:  # Ctrl-C while waiting: the node goes too
        _end(folder, node.process)
        raise
    _end(folder, node.process)
    text = read_from(log, node.log_offset)
    if not exited and not resolves(request.superlink.host):
        return JoinResult(name, None, f"{request.superlink.host} does not resolve to an address on this device "
                                      "(a typo in --superlink, or no network?)")
    return JoinResult(name, None, reason_from_log(text, request.superlink, name,
                                                  None if exited else request.wait))


def supernode_argv(folder: DeviceFolder, request: JoinRequest) -> list[str]:
    node_config = f"{DATA_PATH}='{request.data.resolve()}'"
    if request.user is not None:
        node_config += f" {USER}={request.user}"
    return [flower_supernode(), "--superlink", str(request.superlink),
            "--root-certificates", str(folder.file(CA).resolve()),
            "--auth-supernode-private-key", str(folder.file(KEY).resolve()),
            "--port", str(request.port), "--node-config", node_config]


def flower_supernode() -> str:
    executable = Path(sys.executable).parent / "flower-supernode"
    if not executable.is_file():
        raise FedembError(f"flower-supernode is not installed next to {sys.executable}: install flwr there")
    return str(executable)


def supernode_env(folder: DeviceFolder) -> dict[str, str]:
    """The SuperNode starts flower-superexec and flwr-clientapp by name: this environment's come first."""
    return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                FLWR_HOME=str(folder.file("flwr-home").resolve()),
                PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def read_from(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def activated_node_id(log_text: str) -> int | None:
    match = ACTIVATED.search(log_text)
    return int(match[1]) if match else None


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _end(folder: DeviceFolder, node: subprocess.Popen) -> None:
    """The SuperNode's whole group: it may exit and leave its SuperExec retrying behind it."""
    stop_group(node.pid, grace=5.0)
    node.wait(timeout=5)
    folder.file(PID).unlink(missing_ok=True)


# --- reading the log -------------------------------------------------------------------------------

def log_lines(text: str) -> list[str]:
    """The log's lines that say something: colours, level prefixes, web-server chatter and traceback
    frames left out."""
    lines = []
    for raw in ANSI_COLOUR.sub("", text).splitlines():
        if not raw.strip() or raw[0].isspace():
            continue
        line = LEVEL_PREFIX.sub("", raw).strip()
        if line and not line.startswith(NOISE) and not set(line) <= set("^~ "):
            lines.append(line)
    return lines


def reason_from_log(text: str, superlink: Address, name: str, gave_up_after: float | None = None) -> str:
    """Why a SuperNode did not join, in plain words, from its log (Flower 1.41's messages)."""
    plain = ANSI_COLOUR.sub("", text)
    if "Failed to activate SuperNode" in plain:
        return (f"the server at {superlink} refused to activate this node: its key {name} is not registered "
                f"there (ask the operator to run `fedemb deploy register ... {name}.pub` with this device's "
                "node.key.pub), or a node with this key is already online")
    if verify := re.search(r"certificate verify failed: ([^(\n]*)", plain):
        return (f"TLS verification of {superlink} failed ({verify[1].strip().rstrip('.')}): the CA file does not "
                f"match the server's certificate, or the certificate does not cover {superlink.host}")
    if handshake := re.search(r"\[SSL: [A-Z_]+\] ([^(\n]*)", plain):
        return (f"the TLS handshake with {superlink} failed ({handshake[1].strip()}): is it a SuperLink "
                "with TLS on that port?")
    if "address already in use" in plain:
        return "this device's local port (--port) is in use by another program: join with another --port"
    if "Connection refused" in plain or "Connection attempt failed" in plain:
        return f"nothing answers at {superlink} (is the SuperLink running there, and reachable from here?)"
    lines = log_lines(text)
    if gave_up_after is not None:
        ending = f"; its log ends: {' | '.join(lines[-3:])}" if lines else ""
        return f"the server at {superlink} did not activate this node within {gave_up_after:g} s{ending}"
    return f"the SuperNode stopped: {' | '.join(lines[-3:])}" if lines else "the SuperNode stopped and logged nothing"


# --- status and stop -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceStatus:
    name: str
    pid: int | None  # None: not running
    settings: dict
    last_log_line: str


def status(folder: DeviceFolder) -> DeviceStatus:
    name = folder.name()
    log = folder.file(LOG)
    lines = log_lines(read_tail(log)) if log.is_file() else []
    return DeviceStatus(name, folder.node_pid(), folder.settings(), lines[-1] if lines else "")


def read_tail(log: Path, size: int = 16384) -> str:
    return read_from(log, max(0, log.stat().st_size - size))


def stop(folder: DeviceFolder, grace: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL, to the SuperNode's process group; the PID stopped, None when nothing ran."""
    pid = read_pid(folder.file(PID))
    leftovers = pid is not None and not alive(pid) and group_running(pid)
    if pid is None or (folder.node_pid() is None and not leftovers):
        folder.file(PID).unlink(missing_ok=True)
        return None
    stop_group(pid, grace)
    folder.file(PID).unlink(missing_ok=True)
    return pid
