"""Run a config on Flower's simulation engine (Ray), in this process, and leave nothing running.

Worker mode (default): a few SuperNodes, one per parallel ClientApp that the CPUs (or GPU shares)
allow, each training many virtual clients per round. Device mode: one SuperNode per virtual-client
slot, as in a deployment. With a Ray address the run uses that cluster's resources.

Start-up (docs/performance.md, "Start-up"): fedemb starts the local Ray itself, in a thread of its own
while the driver imports Flower, and without a runtime environment, so that Flower's actors take the
workers Ray has already started instead of starting new ones through Ray's setup_worker.py.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fedemb.config import Config
from fedemb.flower_env import (local_ray_init_args, offline_flower_environment, resolved_engine,
                               silence_third_party_notices, worker_pythonpath)

if TYPE_CHECKING:  # run_setup imports torch: not needed to import this module
    from fedemb.run_setup import RunSetup


def parallel_workers(cfg: Config, cpus: float, gpus: float = 0.0) -> int:
    """How many ClientApps Ray can run at once with these resources."""
    sim = cfg.simulation
    n = int(cpus // sim.cpus_per_client)
    if sim.gpus_per_client > 0:
        n = min(n, int(gpus // sim.gpus_per_client))
    return max(1, n)


def num_supernodes(cfg: Config, virtual_clients: int, cpus: float | None = None, gpus: float | None = None) -> int:
    sim = cfg.simulation
    if sim.num_supernodes:
        return sim.num_supernodes
    if sim.mode == "devices":
        return virtual_clients
    if gpus is None:
        import torch

        gpus = float(torch.cuda.device_count())
    return parallel_workers(cfg, float(cpus if cpus is not None else (os.cpu_count() or 1)), gpus)


def run_simulation(setup: RunSetup, run_dir: Path, verbose: bool = False, show_progress: bool = True,
                   resume: bool = False, ray_address: str = "") -> dict:
    """Run the prepared run `setup` (fedemb.run_setup.prepare_run) into `run_dir`; its results.json's content."""
    cfg = setup.cfg
    offline_flower_environment()
    silence_third_party_notices()
    if resolved_engine(cfg, ray_address, planned_virtual_clients=cfg.run.rounds * setup.virtual_clients) == "inprocess":
        with _flower_log_level(verbose):
            return _run_in_process(setup, run_dir, show_progress, resume, ray_address)
    address = ray_address or cfg.simulation.ray_address
    ray_start = RayStart(address, verbose)  # Ray starts while Flower and the run driver are imported
    try:
        return _run_on_ray(setup, run_dir, verbose, show_progress, resume, ray_start)
    finally:
        ray_start.close()


def _run_on_ray(setup: RunSetup, run_dir: Path, verbose: bool, show_progress: bool, resume: bool,
                ray_start: RayStart) -> dict:
    cfg, virtual_clients = setup.cfg, setup.virtual_clients
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flower_run_simulation

    from simulations.client_app import app as client_app
    from simulations.run import run_federated

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # Flower's in-memory grid sleeps 0.1 s between polls for replies; the state is in memory, so
        # polling at 100 Hz costs nothing and saves most of that wait every round
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = 0.01
        outcome["results"] = run_federated(grid, cfg, run_dir, show_progress=show_progress, resume=resume, setup=setup)

    backend_config = {"client_resources": {"num_cpus": cfg.simulation.cpus_per_client,
                                           "num_gpus": cfg.simulation.gpus_per_client}}
    with _flower_log_level(verbose):
        ray_start.wait()  # Flower finds Ray initialized and uses it as it is
        if ray_start.address:  # size the workers by the cluster's resources
            import ray

            resources = ray.cluster_resources()
            nodes = num_supernodes(cfg, virtual_clients, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
        else:
            nodes = num_supernodes(cfg, virtual_clients)
        flower_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                              backend_config=backend_config, verbose_logging=verbose)
    if "results" not in outcome:
        raise RuntimeError("the simulation ended without results (see the log above)")
    return outcome["results"]


@contextmanager
def _flower_log_level(verbose: bool) -> Iterator[None]:
    import flwr.common.logger  # noqa: F401 - its first import sets the "flwr" level to DEBUG: before ours, not after

    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)  # round-by-round INFO lines would fight the progress bar
    try:
        yield
    finally:
        flwr_logger.setLevel(previous)


def _run_in_process(setup: RunSetup, run_dir: Path, show_progress: bool, resume: bool, ray_address: str) -> dict:
    from fedemb.errors import ConfigError
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    if ray_address:
        raise ConfigError("--ray-address needs simulation.engine = 'ray'")
    grid = InProcessGrid(train, num_supernodes(setup.cfg, setup.virtual_clients))
    return run_federated(grid, setup.cfg, run_dir, show_progress=show_progress, resume=resume, setup=setup)


class RayStart:
    """`ray.init` in a thread of its own, started at once: a local Ray for this run (`address` empty) or a
    connection to the cluster at `address`. The thread lives until close(), because the processes of a
    local Ray die with the thread that started them (Ray starts them with PR_SET_PDEATHSIG).

    A local Ray is started as fedemb.flower_env.local_ray_init_args says: without the runtime environment
    Flower's own ray.init passes (only to set PYTHONPATH, which the workers inherit here instead), so that
    the workers Ray starts with the driver are the ones Flower's actors run in."""

    def __init__(self, address: str = "", verbose: bool = False):
        self.address = address
        self._error: BaseException | None = None
        self._ready, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._start, args=(_init_args(address, verbose),),
                                        name="fedemb-ray-start", daemon=True)
        self._thread.start()

    def _start(self, init_args: dict) -> None:
        try:
            import ray

            with worker_pythonpath():
                ray.init(**init_args)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by wait()
            self._error = exc
        finally:
            self._ready.set()
        self._closed.wait()

    def wait(self) -> None:
        """Until Ray is up (or joined); what ray.init raised, raised here."""
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Shut Ray down (on a cluster: disconnect) and end the thread."""
        self._ready.wait()  # never while ray.init is still starting processes
        try:
            _shutdown_ray()
        finally:
            self._closed.set()
            self._thread.join()


def _init_args(address: str, verbose: bool) -> dict:
    if address:
        return {"address": address, "logging_level": logging.ERROR, "log_to_driver": verbose}
    return local_ray_init_args(verbose)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():  # on a cluster this only disconnects: the cluster keeps running
        ray.shutdown()
