"""`fedemb flwr-run`: a fedemb config through Flower's own CLI (`flwr run .`) on a local simulation SuperLink."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedemb.cli.common import APP_ROOT, app_root, friendly_errors


@friendly_errors
def flwr_run(config: Annotated[Path, typer.Option("--config", "-c", help="A fedemb TOML config inside the fedemb checkout (the Flower app).")] = APP_ROOT / "simulations/configs/quickstart.toml",
             set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")] = None,
             run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where results go (default runs/<name>-flwr-<time> in the checkout).")] = None,
             flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for the local SuperLink (its state and logs).")] = APP_ROOT / ".flwr",
             timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 3600.0,
             show_log: Annotated[bool, typer.Option(help="Print the run's log from Flower.")] = True):
    """Run a config through Flower's own CLI (`flwr run .`) on a local SuperLink.

    Checks the config and data first, submits the run, waits for its final status (Flower's `--stream`
    exits 0 even on failure), prints the run's log and results, and stops the SuperLink, SuperExec and
    Ray processes that `flwr run` leaves running. Exit 0 only when the run completed and wrote
    results.json."""
    from fedemb.config import load_config
    from fedemb.run_setup import prepare_run
    from fedemb.flower_cli_run import FlowerRunError, run_flower_app
    from simulations.engine import num_supernodes

    root = app_root()
    overrides = list(set_ or [])
    config_path = config.resolve()
    if not config_path.is_relative_to(root):
        raise FlowerRunError(f"--config must be inside {root}: Flower ships only the app directory to the SuperLink")
    cfg = load_config(config_path, overrides)
    setup = prepare_run(cfg)
    out = (run_dir or root / "runs" / f"{cfg.run.name}-flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_config = {"config-file": str(config_path.relative_to(root)), "overrides": " ".join(overrides),
                  "run-dir": str(out)}
    outcome = run_flower_app(root, run_config, num_supernodes(cfg, setup.virtual_clients),
                             cfg.simulation.cpus_per_client, flwr_home, timeout)
    completed = outcome.status.startswith("finished:completed")
    if show_log or not completed:
        print(outcome.log, file=sys.stdout if completed else sys.stderr)
    results_file = outcome.run_dir / "results.json"
    if not completed:
        raise FlowerRunError(f"Flower run {outcome.run_id}: {outcome.status} (its log is above)")
    if not results_file.is_file():
        raise FlowerRunError(f"Flower run {outcome.run_id} completed but wrote no {results_file}")
    results = json.loads(results_file.read_text())
    final, privacy = results["final"], results["privacy"]
    print(f"flwr run {outcome.run_id}: {results['rounds_completed']} rounds, recall@1 {final['recall_at_1']:.3f}, "
          f"TAR@FAR1e-3 {final['tar_at_far_1e-3']:.3f}, TAR@FAR1e-1 {final['tar_at_far_1e-1']:.3f}, "
          f"epsilon {float(privacy['epsilon']):.3g} (delta {privacy['delta']:.2g}); results in {outcome.run_dir}")
