"""The operating system's processes, on psutil: the one place fedemb (and its tests and scripts) starts,
finds, waits for and stops them.

- Detached groups: `start_detached` runs a command in its own session (process group) with its output in a
  log and its PID in a file, so that a later command, in another process, finds it (`read_pid`), asks
  whether it runs (`alive`, `group_running`) and ends it with everything it started (`stop_group`).
- Finding: `find` (by command line), `tree` (a process and its descendants), `group` (a process group's
  members), `command_line`.
- Waiting and stopping: `wait_gone`, `stop_groups`, `kill`; `leftovers` (what still runs after a wait).
- Facts: `listening` (a TCP port), `started_at`, `tree_memory` (RSS and PSS of a tree, for benchmarks).

Zombies count as gone everywhere: containers may reap late, and defunct processes linger under PID 1.
psutil is a base dependency because a device's `fedemb-device join/stop` uses this module too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

Process = psutil.Process
CommandLineMatch = Callable[[list[str]], bool]


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


def alive(process: int | Process | None) -> bool:
    """Running and not a zombie. A Process object also knows when its PID has gone to another process."""
    if process is None:
        return False
    try:
        proc = process if isinstance(process, Process) else Process(process)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess among them
        return False
    except psutil.AccessDenied:  # another user's: it runs
        return True


def command_line(process: int | Process) -> list[str]:
    """Its arguments; [] when it is gone or not ours to read."""
    try:
        return (process if isinstance(process, Process) else Process(process)).cmdline()
    except psutil.Error:
        return []


def find(match: CommandLineMatch) -> list[Process]:
    """The running processes whose command line (a list of arguments) `match` accepts."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"]
        if argv and match(argv) and alive(proc):
            found.append(proc)
    return found


def tree(process: int | Process) -> list[Process]:
    """The process and its descendants, those running; [] when it is gone."""
    try:
        root = process if isinstance(process, Process) else Process(process)
        return [p for p in (root, *root.children(recursive=True)) if alive(p)]
    except psutil.NoSuchProcess:
        return []


def group(pgid: int) -> list[Process]:
    """The running members of process group `pgid`."""
    return [proc for proc in psutil.process_iter() if _pgid(proc) == pgid and alive(proc)]


def group_running(pgid: int) -> bool:
    return bool(group(pgid))


def process_groups(processes: Iterable[Process]) -> set[int]:
    """The process groups the running ones of `processes` belong to."""
    return {pgid for proc in processes if alive(proc) and (pgid := _pgid(proc)) is not None}


def _pgid(proc: Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


def wait_gone(processes: Iterable[Process], timeout: float, poll: float = 0.2) -> list[Process]:
    """Wait until none of `processes` runs, or `timeout` seconds; those still running."""
    processes = list(processes)
    deadline = time.monotonic() + timeout
    while (running := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(poll)
    return running


def stop_groups(pgids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM to each group (Flower and Ray processes shut down cleanly on it), then SIGKILL to whatever
    of them is left after `grace` seconds; waits up to 2 s more for the killed to go."""
    pgids = set(pgids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pgid in list(pgids):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pgids.discard(pgid)
        deadline = time.monotonic() + wait
        while (pgids := {g for g in pgids if group_running(g)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pgids:
            return


def stop_group(pgid: int, grace: float = 10.0) -> None:
    stop_groups([pgid], grace)


def kill(processes: Iterable[Process]) -> None:
    """SIGKILL to each of `processes` that still runs."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def leftovers(match: CommandLineMatch, ignore: Iterable[Process] = (), timeout: float = 0.0,
              poll: float = 0.5) -> list[Process]:
    """The processes `match` finds, other than `ignore`, still running after waiting up to `timeout`
    seconds for them to exit."""
    ignore = set(ignore)
    deadline = time.monotonic() + timeout
    while (left := [p for p in find(match) if p not in ignore]) and time.monotonic() < deadline:
        time.sleep(poll)
    return left


def listening(port: int) -> bool:
    """Whether a process on this machine listens on TCP `port`."""
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


def started_at(process: int | Process | None = None) -> float:
    """When the process (this one by default) started, in seconds since the epoch."""
    return (process if isinstance(process, Process) else Process(process)).create_time()


def tree_memory(process: int | Process) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over the process and its descendants: the RSS sum counts shared pages
    once per process, the PSS sum shares them out (what the tree really holds)."""
    rss = pss = 0
    for proc in tree(process):
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss, pss
