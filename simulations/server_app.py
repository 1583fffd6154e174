"""The ServerApp for `flwr run .`: reads the fedemb config named in the run config and runs DP-FedEmb.

Run config keys (pyproject [tool.flwr.app.config], or `flwr run . --run-config "..."`):
  config-file  a fedemb TOML config; a relative path is read from the app (this repository), because
               Flower unpacks the app elsewhere and runs it from the directory the SuperLink started in
  overrides    "section.key=value" items separated by spaces
  run-dir      where results go (default: runs/<name>-<time> under the SuperLink's working directory)
`fedemb simulate` builds its own ServerApp around an already loaded config (simulations.engine).
"""

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedemb.config import load_config
from fedemb.monitoring.metric_names import RECALL_AT_1
from fedemb.run_dir import new_run_dir
from simulations.run import run_federated

APP_ROOT = Path(__file__).resolve().parents[1]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    config_file = Path(str(rc.get("config-file", "simulations/configs/quickstart.toml")))
    if not config_file.is_absolute():
        config_file = APP_ROOT / config_file
    cfg = load_config(config_file, shlex.split(str(rc.get("overrides", ""))))
    run_dir = new_run_dir(cfg, str(rc.get("run-dir", "")) or None)
    results = run_federated(grid, cfg, run_dir, show_progress=False)
    print(f"fedemb: results in {run_dir}/results.json (recall@1 {results['final'][RECALL_AT_1]:.3f}, "
          f"epsilon {results['privacy']['epsilon']:.3g})")
