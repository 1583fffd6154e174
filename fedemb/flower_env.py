"""The environment fedemb runs Flower and Ray in: offline, on no cluster unless asked, without notices
a user cannot act on. For this process, or for a Flower process about to be started.

How fedemb starts a local Ray (`local_ray_init_args`, `worker_pythonpath`): a run's own (simulations.engine)
and a sweep's warm one (`WarmRay`: one Ray that the runs of `fedemb experiments run` join instead of
each starting and stopping its own), so that a run finds the same Ray either way."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path


def offline_flower_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """No telemetry, no runtime dependency installation, and no silent attachment to a Ray cluster
    (in this process's environment, or in `env` for a process about to be started)."""
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")


# Third-party notices that a user of fedemb cannot act on, silenced narrowly: (category, message start,
# module that raises it). Ray's tip at ray.init is about a future default for workers that request
# no GPU; fedemb's workers request GPUs only through simulation.gpus_per_client.
THIRD_PARTY_NOTICES = [
    (FutureWarning, "Tip: In future versions of Ray, Ray will no longer override accelerator", r"ray\._private\.worker"),
]


def silence_third_party_notices() -> None:
    for category, message, module in THIRD_PARTY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# ----------------------------------------------------------------------------- a local Ray
def local_ray_init_args(verbose: bool = False) -> dict:
    """ray.init's arguments for a local Ray of this machine's CPUs, quiet, without the dashboard and
    without a runtime environment (the workers Ray starts with the first driver are then the ones
    Flower's actors run in; a runtime environment would start new ones through Ray's setup_worker.py)."""
    return {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False,
            "logging_level": logging.ERROR, "log_to_driver": verbose}


@contextmanager
def worker_pythonpath() -> Iterator[None]:
    """PYTHONPATH as Flower gives its Ray workers (this process's sys.path first), while a local Ray
    starts: its processes inherit it; this process's own environment is restored afterwards."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *([previous] if previous else [])])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


class WarmRay:
    """A local Ray kept running for several runs (a sweep), in a keeper process started in `cwd`: each
    run joins it at `address` (`fedemb simulate --ray-address`) instead of starting and stopping its own.

    The keeper holds Ray until close(), or until the process that started it ends (its stdin closes):
    it then shuts Ray down, and Ray's own reaper stops Ray's processes if the keeper itself is killed."""

    def __init__(self, cwd: Path, timeout_s: float = 120.0):
        offline_flower_environment()
        self._keeper = subprocess.Popen(
            [sys.executable, "-c", "from fedemb.flower_env import keep_local_ray; keep_local_ray()"],
            cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = _announced_address(self._keeper, timeout_s)
        if not self.address:
            self.close()
            raise RuntimeError("the sweep's Ray did not start (see its error above)")

    def alive(self) -> bool:
        """The keeper runs and its Ray answers at `address` (a Ray stopped from outside, e.g. by
        `ray stop`, would leave a run that joins it waiting for it forever)."""
        if self._keeper.poll() is not None:
            return False
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5.0):
                return True
        except OSError:
            return False

    def close(self, timeout_s: float = 60.0) -> None:
        if self._keeper.poll() is None:
            self._keeper.stdin.close()
            try:
                self._keeper.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._keeper.kill()
                self._keeper.wait()

    def __enter__(self) -> WarmRay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _announced_address(keeper: subprocess.Popen, timeout_s: float) -> str:
    """The address the keeper announces ("address HOST:PORT"), or "" when it ends or is silent for `timeout_s`."""
    box: list[str] = []

    def read() -> None:
        for line in keeper.stdout:
            if line.startswith("address "):
                box.append(line.split(" ", 1)[1].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0] if box else ""


def keep_local_ray() -> None:
    """The keeper (WarmRay): start a local Ray, say its address, hold it until stdin closes."""
    import ray

    offline_flower_environment()
    silence_third_party_notices()
    with worker_pythonpath():
        ray.init(**local_ray_init_args())
    try:
        print("address", ray.get_runtime_context().gcs_address, flush=True)
        os.dup2(2, 1)  # whatever else is printed goes to stderr, not to a pipe nobody reads
        sys.stdin.read()
    finally:
        ray.shutdown()


AUTO_INPROCESS_MAX_CPUS = 2
# On 2 idle CPUs Ray's start-up costs about 9 s more than the in-process engine's, and its two nodes then
# train at once instead of one after another: 3.4 ms less per virtual client for the small LeNet
# (docs/performance.md, "Round time against cohort size"). Past this many virtual clients trained in a
# run, Ray has paid for its start-up about four times over.
AUTO_RAY_MIN_PLANNED = 10_000


def resolved_engine(cfg, ray_address: str = "", cpus: int | None = None, planned_virtual_clients: int = 0) -> str:
    """simulation.engine with "auto" decided for this machine and run: "ray" or "inprocess". `cfg`: a
    Config; `planned_virtual_clients`: rounds × M, when known."""
    sim = cfg.simulation
    if sim.engine != "auto":
        return sim.engine
    if ray_address or sim.ray_address or sim.gpus_per_client > 0:
        return "ray"
    if planned_virtual_clients >= AUTO_RAY_MIN_PLANNED:
        return "ray"
    return "inprocess" if (cpus or os.cpu_count() or 1) <= AUTO_INPROCESS_MAX_CPUS else "ray"
