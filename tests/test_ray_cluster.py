"""`fedemb simulate --ray-address` runs on an existing Ray cluster (started with scripts/ray_cluster.sh),
sizes its workers by the cluster's CPUs, and leaves the cluster as it found it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedemb.deploy.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ray_cluster.sh"


@pytest.mark.integration
@pytest.mark.processes
def test_simulate_on_an_existing_ray_cluster(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = subprocess.run([str(SCRIPT), "head", str(port), "3"], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        run_dir = tmp_path / "run"
        exe = str(Path(sys.executable).with_name("fedemb"))
        done = subprocess.run([exe, "simulate", "-c", str(ROOT / "simulations/configs/quickstart.toml"),
                               "--set", "run.rounds=2", "--set", "run.eval_every=0", "--set", "data.num_users=300",
                               "--ray-address", f"127.0.0.1:{port}", "--run-dir", str(run_dir)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["rounds_completed"] == 2
        assert results["nodes"] == 3  # one worker per CPU of the cluster (3), not of this machine
        status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, env=env, timeout=60)
        assert status.returncode == 0 and "3.0 CPU" in status.stdout  # the cluster is still there
    finally:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, env=env, timeout=60)
