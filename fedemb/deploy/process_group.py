"""Detached processes that can be stopped with everything they start: each runs in its own session
(process group) with its output in a log file and its PID in a file, so that a later command, in
another process, finds it, asks whether it still runs and ends the whole group.

Standard library only: a device's lean install uses it too (fedemb.deploy.device_node).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start_detached(argv: list[str], log: Path, pid_file: Path, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` in a new session, appending its output to `log`; its PID goes to `pid_file`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def process_running(pid: int | None) -> bool:
    """Running and not a zombie (containers may reap late: defunct processes linger under PID 1)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def group_running(pgid: int) -> bool:
    """Whether any live process is left in process group `pgid`."""
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


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM to the group (Flower processes shut down cleanly on it), then SIGKILL to whatever of it is
    left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_running(pgid):
            time.sleep(0.2)
        if not group_running(pgid):
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return False
