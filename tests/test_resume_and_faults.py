"""Real processes, real signals: a run killed with SIGKILL at several points and resumed ends with the
same model and the same privacy ledger as an uninterrupted run (seeded mode); nodes that time out or
drop out do not stop a run, change its denominator or touch its ledger."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.test_simulation_integration import ray_like_processes

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations/configs/quickstart.toml"
SMALL = ["run.rounds=6", "run.checkpoint_every=2", "run.eval_every=3", "run.seed=3", "data.num_users=300",
         "sampling.rate=0.2", "simulation.num_supernodes=2"]
EXE = str(Path(sys.executable).with_name("fedemb"))


def simulate_cmd(run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [EXE, "simulate", "--config", str(QUICKSTART), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def env():
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def ledger_entries(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "privacy.json").read_text())["entries"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_when(run_dir: Path, entries: int, tmp_path: Path) -> list:
    """Start the run in its own session and SIGKILL the whole session once the ledger holds `entries`.
    Returns the processes the run had started (Ray's among them), to check that none survive."""
    proc = subprocess.Popen(simulate_cmd(run_dir, SMALL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path, env=env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while ledger_entries(run_dir) < entries:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    started = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return started


def assert_all_gone(processes):
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"processes left running after the kill: {[(p.pid, p.name()) for p in alive]}"


def assert_nothing_left(before):
    deadline = time.monotonic() + 20
    while (left := ray_like_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"


@pytest.mark.integration
def test_a_run_killed_at_several_points_resumes_to_the_same_model_and_ledger(tmp_path):
    before = ray_like_processes()
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(simulate_cmd(reference, SMALL), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected_model = torch.load(reference / "checkpoints/final.pt")
    expected_ledger = json.loads((reference / "privacy.json").read_text())
    assert len(expected_ledger["entries"]) == 6

    for kill_at in (1, 4):  # before the first checkpoint; between checkpoints, mid-round
        run_dir = tmp_path / f"killed-at-{kill_at}"
        started = kill_when(run_dir, kill_at, tmp_path)
        assert not (run_dir / "results.json").exists()
        assert_all_gone(started)
        resumed = subprocess.run([EXE, "simulate", "--resume", str(run_dir)], capture_output=True, text=True,
                                 cwd=tmp_path, env=env(), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        model = torch.load(run_dir / "checkpoints/final.pt")
        assert all(torch.equal(model[k], expected_model[k]) for k in expected_model), f"model differs (kill at {kill_at})"
        assert json.loads((run_dir / "privacy.json").read_text()) == expected_ledger
        results = json.loads((run_dir / "results.json").read_text())
        assert results["resumed"] and results["rounds_completed"] == 6
        assert [r["round"] for r in results["history"]] == list(range(1, 7))
    assert_nothing_left(before)


@pytest.mark.integration
def test_nodes_that_time_out_or_drop_out_are_counted_and_change_nothing_else(tmp_path):
    from fedemb.config import load_config
    from fedemb.federated import prepare_run

    before = ray_like_processes()
    # the deadline leaves room for the ClientApp actors' start-up (torch imports) in round 1
    overrides = ["run.rounds=3", "run.eval_every=0", "run.seed=5", "data.num_users=100", "sampling.rate=0.08",
                 "simulation.num_supernodes=2", "simulation.round_timeout_s=12",
                 "simulation.faults.timeout_rate=0.15", "simulation.faults.drop_rate=0.1"]
    run_dir = tmp_path / "run"
    done = subprocess.run(simulate_cmd(run_dir, overrides), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 3
    assert results["totals"]["virtual-clients-missing"] > 0
    assert results["totals"]["virtual-clients-accepted"] > 0
    assert all(r["denominator"] == results["privacy"]["virtual_clients_per_round"] for r in results["history"])
    plan = prepare_run(load_config(QUICKSTART, overrides)).privacy
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert [float(e["epsilon"]) for e in ledger["entries"]] == pytest.approx([plan.epsilon_after(r) for r in range(1, 4)])
    assert_nothing_left(before)
