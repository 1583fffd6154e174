"""Run a config on Flower's simulation engine (Ray), in this process, and leave nothing running."""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

from fedemb.config import Config


def offline_flower_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """No telemetry, no runtime dependency installation, and no silent attachment to a Ray cluster
    (in this process's environment, or in `env` for a process about to be started)."""
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")


def num_supernodes(cfg: Config, virtual_clients: int) -> int:
    return cfg.simulation.num_supernodes or virtual_clients


def run_simulation(cfg: Config, run_dir: Path, virtual_clients: int, verbose: bool = False,
                   show_progress: bool = True, resume: bool = False) -> dict:
    offline_flower_environment()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flower_run_simulation

    from fedemb.federated import run_federated
    from simulations.client_app import app as client_app

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome["results"] = run_federated(grid, cfg, run_dir, show_progress=show_progress, resume=resume)

    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)  # round-by-round INFO lines would fight the progress bar
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client,
                             "num_gpus": cfg.simulation.gpus_per_client},
        "init_args": {"address": "local", "num_cpus": cpus, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": verbose},
    }
    try:
        flower_run_simulation(server_app=server_app, client_app=client_app,
                              num_supernodes=num_supernodes(cfg, virtual_clients),
                              backend_config=backend_config, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(previous)
        _shutdown_ray()
    if "results" not in outcome:
        raise RuntimeError("the simulation ended without results (see the log above)")
    return outcome["results"]


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
