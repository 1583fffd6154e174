"""Run the repository as a Flower App with Flower's own CLI (`flwr run .`) and leave nothing behind.

`flwr run` in Flower 1.41 starts a detached local SuperLink (and its SuperExec, which starts the
simulation and Ray) that outlives the command, and `flwr run --stream` exits 0 even when the run failed.
This module submits the run, waits for its final status, checks that results were written, and stops the
SuperLink it started, whatever happens in between.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedemb.errors import FedembError
from fedemb.flower_env import offline_flower_environment
from fedemb.os_processes import Process, find, listening, process_groups, stop_groups, tree, wait_gone

DEFAULT_PORT = "39091"
STATUS_POLL_S = 10.0


class FlowerRunError(FedembError):
    """`flwr run` could not be started, or the run did not complete."""


@dataclass
class FlowerRunOutcome:
    run_id: str
    status: str
    run_dir: Path
    log: str


def flower_environment(app_dir: Path, flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    offline_flower_environment(env)
    venv_bin = app_dir / ".venv" / "bin"
    if venv_bin.is_dir():  # flwr starts `flower-superlink` by bare name
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_config_string(values: dict[str, str]) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def superlink_processes(flwr_home: Path) -> list[Process]:
    """Local SuperLinks that `flwr run` started for this FLWR_HOME (recognised by their log file)."""
    log_file = str(flwr_home / "local-superlink" / "superlink.log")
    return find(lambda argv: any(Path(part).name == "flower-superlink" for part in argv[:2]) and log_file in argv)


def stop_local_superlink(flwr_home: Path, grace_s: float = 5.0) -> int:
    """Stop the SuperLink of this FLWR_HOME and every process under it: SuperExec, simulation, Ray. The
    SuperLink and its SuperExec run in sessions of their own: their process groups are stopped."""
    links = superlink_processes(flwr_home)
    for link in links:
        execs = find(lambda argv: "--parent-pid" in argv and str(link.pid) in argv)
        family = [p for root in (link, *execs) for p in tree(root)]
        stop_groups(process_groups(family), grace_s)
        wait_gone(family, grace_s)
    return len(links)


def run_flower_app(app_dir: Path, run_config: dict[str, str], num_supernodes: int, cpus_per_client: float,
                   flwr_home: Path, timeout_s: float, poll_s: float = 1.0) -> FlowerRunOutcome:
    """Submit `flwr run APP_DIR` to a fresh local SuperLink, wait for the run to finish, stop the SuperLink."""
    app_dir, flwr_home = app_dir.resolve(), flwr_home.resolve()
    run_dir = Path(run_config["run-dir"])
    if not run_dir.is_absolute():
        raise ValueError("run-dir must be absolute: the ServerApp runs in another working directory")
    env = flower_environment(app_dir, flwr_home)
    port = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_PORT)
    if listening(int(port)):
        raise FlowerRunError(f"a local SuperLink (or something else) already listens on port {port}: stop it, "
                             "or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT to free ports")
    flwr_home.mkdir(parents=True, exist_ok=True)
    cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client  # Flower wants an int here
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"
    try:
        run_id = submit_run(app_dir, ["--federation-config", federation], run_config, env)
        status = wait_for_final_status(run_id, env, app_dir, timeout_s, poll_s, run_dir / "results.json")
        log = flwr_command(["flwr", "log", run_id, "--show"], env, app_dir, timeout_s=60).stdout
    finally:
        stop_local_superlink(flwr_home)
    return FlowerRunOutcome(run_id, status, run_dir, log)


def submit_run(app_dir: Path, target: list[str], run_config: dict[str, str], env: dict) -> str:
    """`flwr run APP_DIR *target` with this run config; the run id, or FlowerRunError with Flower's reason."""
    command = ["flwr", "run", str(app_dir), *target, "--format", "json", "--run-config", run_config_string(run_config)]
    submitted = flwr_command(command, env, app_dir, timeout_s=120)
    try:
        reply = json.loads(submitted.stdout)
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("success") or "run-id" not in reply:
        detail = (reply.get("error-message") or submitted.stderr or submitted.stdout).strip().splitlines()
        raise FlowerRunError(f"`flwr run` did not start the run: {detail[-1] if detail else 'no output'}")
    return str(reply["run-id"])


def wait_for_final_status(run_id: str, env: dict, cwd: Path, timeout_s: float, poll_s: float,
                           results_file: Path | None = None, while_waiting=None) -> str:
    """`finished:<details>`, or a description of the timeout. Each `flwr ls` is a new Python process
    (seconds of CPU on a small machine): ask every `poll_s` seconds once the run has written its results,
    and at most every STATUS_POLL_S seconds before. `while_waiting()` is called every `poll_s` seconds."""
    deadline = time.monotonic() + timeout_s
    next_ask = time.monotonic()
    while time.monotonic() < deadline:
        if while_waiting is not None:
            while_waiting()
        finishing = results_file is not None and results_file.exists()
        if finishing or time.monotonic() >= next_ask:
            status = run_status(run_id, env, cwd)
            if status.startswith("finished"):
                return status
            next_ask = time.monotonic() + STATUS_POLL_S
        time.sleep(poll_s)
    return f"did not finish within {timeout_s:.0f} s"


def run_status(run_id: str, env: dict, cwd: Path) -> str:
    listing = flwr_command(["flwr", "ls", "--run-id", run_id, "--format", "json"], env, cwd, timeout_s=60)
    try:
        run = json.loads(listing.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise FlowerRunError(f"`flwr ls --run-id {run_id}` gave no status: {listing.stdout.strip()[:200]}") from None
    return format_status(run["status"], run.get("status-details", ""))


def format_status(status: str, details: str) -> str:
    """`finished:completed`, or `finished:failed: <why>`; Flower fills empty details with "N/A"."""
    details = str(details or "").strip()
    return f"{status}: {details}" if details and details != "N/A" else status


def flwr_command(command: list[str], env: dict, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise FlowerRunError("`flwr` is not on PATH: run scripts/setup.sh first") from None
    except subprocess.TimeoutExpired:
        raise FlowerRunError(f"`{shlex.join(command[:3])}` did not answer within {timeout_s:.0f} s") from None
