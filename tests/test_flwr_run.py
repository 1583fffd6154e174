"""`flwr run .` (Flower's own CLI, local SuperLink, simulation on Ray) runs the repository's ServerApp and
ClientApp, learns, writes the run directory, and leaves no SuperLink, SuperExec or Ray process behind.

Opt-in (`pytest --flower-cli`): in 5 of 21 runs under pytest while it was written, the run stalled. py-spy
showed the ServerApp thread spinning in NumPy's multi-threaded OpenBLAS during evaluation. The evaluation
now runs BLAS single-threaded. The test joins the default suite once enough runs show that fix holds
(docs/flower.md)."""

import json
import os
import subprocess
import sys
import tomllib

import pytest

from fedemb.deploy.processes import free_port
from tests.helpers import assert_nothing_left, ray_like_processes


@pytest.mark.integration
@pytest.mark.processes
def test_flwr_run_completes_learns_and_stops_its_superlink(tmp_path, flower_cli):
    before = ray_like_processes()
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "fedemb", "flwr-run", "--run-dir", str(run_dir),
           "--flwr-home", str(tmp_path / "flwr-home"), "--timeout", "400", "--no-show-log"]
    for item in ("run.rounds=3", "run.eval_every=3", "privacy.noise_multiplier=0", "simulation.round_timeout_s=90"):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "recall@1" in proc.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 3
    # three rounds move TAR@FAR=1e-1 (0.446 -> 0.531 with these settings in `fedemb simulate`), recall@1
    # hardly (0.841 -> 0.846)
    assert results["final"]["tar_at_far_1e-1"] > results["initial"]["tar_at_far_1e-1"] + 0.03
    assert tomllib.loads((run_dir / "config.toml").read_text())["privacy"]["noise_multiplier"] == 0  # overrides arrived

    assert_nothing_left(before)


@pytest.mark.slow
def test_flwr_run_refuses_a_config_outside_the_app(tmp_path):
    outside = tmp_path / "x.toml"
    outside.write_text("[run]\nrounds = 1\n")
    proc = subprocess.run([sys.executable, "-m", "fedemb", "flwr-run", "-c", str(outside)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "inside" in proc.stderr and "Traceback" not in proc.stderr
