"""Real processes, real signals: a run killed with SIGKILL at several points and resumed ends with the
same model and the same privacy ledger as an uninterrupted run (seeded mode); nodes that time out or
drop out do not stop a run, change its denominator or touch its ledger.

In process (InProcessGrid, about a second per run): a resume never drops releases already made (a
missing or foreign ledger is refused, nothing deleted), a seeded replay is free only if it releases the
same bits, and a finished run deletes its server-private state unless asked to keep it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedemb.os_processes import tree, wait_gone
from tests.helpers import SMALL_RUN, assert_nothing_left, described, die_at_server_step, ray_like_processes

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations/configs/quickstart.toml"
SMALL = ["run.rounds=6", "run.checkpoint_every=2", "run.eval_every=3", "run.seed=3", "data.num_users=300",
         "sampling.rate=0.2", "simulation.num_supernodes=2", 'simulation.engine="ray"']
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


def kill_when(run_dir: Path, entries: int, tmp_path: Path, command: list[str] | None = None) -> list:
    """Start the run (or `command`) in its own session and SIGKILL the whole session once the ledger
    holds `entries`. Returns the processes the run had started (Ray's among them), to check that none
    survive."""
    proc = subprocess.Popen(command or simulate_cmd(run_dir, SMALL), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path, env=env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while ledger_entries(run_dir) < entries:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    started = tree(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return started


def assert_all_gone(processes):
    alive = wait_gone(processes, timeout=45)
    assert not alive, f"processes left running after the kill: {described(alive)}"


@pytest.mark.integration
@pytest.mark.processes
def test_a_run_killed_at_several_points_resumes_to_the_same_model_and_ledger(tmp_path):
    before = ray_like_processes()
    # the uninterrupted reference runs on the in-process engine: a seeded run gives the same bits on either
    # engine, so this also holds the two engines to each other
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(simulate_cmd(reference, SMALL + ['simulation.engine="inprocess"']), capture_output=True,
                          text=True, cwd=tmp_path, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected_model = torch.load(reference / "checkpoints/final.pt")
    expected_ledger = json.loads((reference / "privacy.json").read_text())
    assert len(expected_ledger["entries"]) == 6

    # killed between checkpoints, mid-round (a crash before the first checkpoint: the in-process test below)
    run_dir = tmp_path / "killed"
    resume = [EXE, "simulate", "--resume", str(run_dir)]
    started = kill_when(run_dir, 4, tmp_path)
    assert not (run_dir / "results.json").exists()
    assert_all_gone(started)
    resumed = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    model = torch.load(run_dir / "checkpoints/final.pt")
    assert all(torch.equal(model[k], expected_model[k]) for k in expected_model), "the resumed model differs"
    assert json.loads((run_dir / "privacy.json").read_text()) == expected_ledger
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed"] and results["rounds_completed"] == 6
    assert [r["round"] for r in results["history"]] == list(range(1, 7))
    assert_nothing_left(before)


@pytest.mark.integration
@pytest.mark.processes
def test_nodes_that_time_out_or_drop_out_are_counted_and_change_nothing_else(tmp_path):
    from fedemb.config import load_config
    from fedemb.run_setup import prepare_run

    before = ray_like_processes()
    # the deadline leaves room for the ClientApp actors' start-up (torch imports) in round 1, also while
    # another test worker keeps the CPUs busy; seed 15's node-fault draws lose some nodes' replies and
    # keep others (a simulated late or lost node costs no waiting), and its virtual-client draws time out
    # and drop some virtual clients of the nodes that reply
    overrides = ['simulation.engine="ray"', "run.rounds=2", "run.eval_every=0", "run.seed=15", "data.num_users=100", "sampling.rate=0.08",
                 "simulation.num_supernodes=2", "simulation.round_timeout_s=25",
                 "simulation.faults.timeout_rate=0.15", "simulation.faults.drop_rate=0.1",
                 "simulation.faults.node_timeout_rate=0.2", "simulation.faults.node_drop_rate=0.2"]
    run_dir = tmp_path / "run"
    done = subprocess.run(simulate_cmd(run_dir, overrides), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 2
    totals = json.loads((run_dir / "private" / "summary.json").read_text())["totals"]  # server-private counts
    assert totals["virtual-clients-missing"] > 0 and totals["virtual-clients-accepted"] > 0
    assert totals["virtual-clients-timed-out"] + totals["virtual-clients-dropped"] > 0
    assert all(r["denominator"] == results["privacy"]["virtual_clients_per_round"] for r in results["history"])
    plan = prepare_run(load_config(QUICKSTART, overrides)).privacy
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert [float(e["epsilon"]) for e in ledger["entries"]] == pytest.approx([plan.epsilon_after(r) for r in range(1, 3)])
    assert_nothing_left(before)


# ---------------------------------------------------------------- in process


def run_in_process(run_dir: Path, *overrides: str, resume: bool = False) -> dict:
    from fedemb.config import load_config, to_toml
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    cfg = load_config(None, SMALL_RUN + list(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    return run_federated(InProcessGrid(train, 2), cfg, run_dir, show_progress=False, resume=resume)


KEEP = ["run.checkpoint_every=1", "run.keep_private_state=true"]


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_without_the_ledger_is_refused_in_one_line_and_deletes_nothing(tmp_path):
    """state.pt says 2 rounds ran; without privacy.json a resume would start an empty ledger and
    drop the ε those rounds spent."""
    from typer.testing import CliRunner

    from fedemb.cli import app
    from fedemb.errors import ConfigError

    run_dir = tmp_path / "run"
    run_in_process(run_dir, *KEEP)
    (run_dir / "privacy.json").unlink()
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"privacy ledger privacy.json is missing, so the 2 rounds in "
                                          r"checkpoints/state.pt would go unaccounted"):
        run_in_process(run_dir, *KEEP, resume=True)
    result = CliRunner().invoke(app, ["simulate", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "privacy.json is missing" in result.output and result.output.count("error:") == 1
    assert files_of(run_dir) == before


@pytest.mark.parametrize("change, reason", [
    ("drop-last-entry", r"no entry for round 2"),
    ("privacy.delta=1e-3", r"the ledger's δ is .*, the config's 0.001"),
    ('privacy.accountant="prv"', r"the ledger composes with the rdp accountant, the config with prv"),
    ('privacy.clipping="adaptive"', r"training releases are sampled_gaussian, the config's are "
                                    r"sampled_gaussian\+adaptive_clipping"),
    ("privacy.noise_multiplier=2.0", r"the ledger accounts round 2 as .* the config would account it as"),
])
def test_resume_with_a_ledger_that_does_not_match_the_state_or_config_is_refused(tmp_path, change, reason):
    from fedemb.config import load_config
    from fedemb.errors import ConfigError
    from fedemb.run_setup import check_resume, prepare_run

    run_dir = tmp_path / "run"
    run_in_process(run_dir, *KEEP)
    overrides = KEEP
    if change == "drop-last-entry":  # e.g. another run's ledger, or an older copy
        ledger = json.loads((run_dir / "privacy.json").read_text())
        ledger["entries"] = ledger["entries"][:-1]
        (run_dir / "privacy.json").write_text(json.dumps(ledger))
    else:
        overrides = KEEP + [change]
    before = files_of(run_dir)
    cfg = load_config(None, SMALL_RUN + overrides)
    with pytest.raises(ConfigError, match=f"cannot resume {re.escape(str(run_dir))}: .*{reason}"):
        check_resume(run_dir, cfg, prepare_run(cfg))
    assert files_of(run_dir) == before


def ledger_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "privacy.json").read_text())


@pytest.mark.slow
def test_a_run_that_crashes_before_its_first_checkpoint_resumes_to_the_same_model_and_ledger(tmp_path, monkeypatch):
    """Round 2 is recorded in the ledger, then the process dies before any checkpoint (no state.pt):
    --resume starts over from the config and, seeded, replays rounds 1 and 2 bit for bit at no new cost."""
    import torch

    from strategies.server_optimizer import ServerOptimizer

    small = ["run.rounds=3", "run.checkpoint_every=3", "run.eval_every=0"]
    run_in_process(tmp_path / "uninterrupted", *small)
    honest_step = die_at_server_step(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run_in_process(tmp_path / "crashed", *small)
    assert not (tmp_path / "crashed" / "checkpoints" / "state.pt").exists() and ledger_entries(tmp_path / "crashed") == 2
    monkeypatch.setattr(ServerOptimizer, "step", honest_step)
    results = run_in_process(tmp_path / "crashed", *small, resume=True)
    assert results["rounds_completed"] == 3 and results["resumed"]
    expected = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "final.pt")
    model = torch.load(tmp_path / "crashed" / "checkpoints" / "final.pt")
    assert all(torch.equal(model[k], expected[k]) for k in expected), "the resumed model differs"
    assert ledger_of(tmp_path / "crashed") == ledger_of(tmp_path / "uninterrupted")


def test_a_seeded_replay_is_free_only_if_it_releases_the_same_bits(tmp_path):
    """Round 2 was released and recorded, then the run is resumed from the state after round 1 (a
    crash before round 2's checkpoint). The same code and config replay round 2 bit for bit: nothing new
    is spent. A change that alters round 2's release (here the clients' learning rate) makes it a new
    release: the ledger grows by an entry under a new attempt, and ε with it."""
    run_dir = tmp_path / "run"
    state = run_dir / "checkpoints/state.pt"
    run_in_process(run_dir, *KEEP, "run.rounds=1")
    after_round_1 = state.read_bytes()
    run_in_process(run_dir, *KEEP, "run.rounds=2", resume=True)
    recorded = ledger_of(run_dir)
    assert [(e["round"], e["attempt"]) for e in recorded["entries"]] == [(1, 0), (2, 0)]
    assert all(len(e["release_sha256"]) == 64 for e in recorded["entries"])

    state.write_bytes(after_round_1)
    run_in_process(run_dir, *KEEP, "run.rounds=2", resume=True)
    assert ledger_of(run_dir) == recorded

    state.write_bytes(after_round_1)
    run_in_process(run_dir, *KEEP, "run.rounds=2", "client.lr=0.02", resume=True)
    grown = ledger_of(run_dir)
    assert [(e["round"], e["attempt"]) for e in grown["entries"]] == [(1, 0), (2, 0), (2, 1)]
    assert grown["entries"][2]["release_sha256"] != grown["entries"][1]["release_sha256"]
    assert grown["entries"][:2] == recorded["entries"]
    assert float(grown["epsilon"]) > float(recorded["epsilon"])


TREE = ['privacy.mechanism="tree"', 'sampling.method="limited"', "sampling.min_separation=1",
        "run.checkpoint_every=1"]


def tensors_in(x) -> int:
    if isinstance(x, torch.Tensor):
        return 1
    if isinstance(x, dict):
        return sum(tensors_in(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensors_in(v) for v in x)
    return 0


def test_a_finished_run_deletes_its_tree_noise_and_secret_unless_asked_to_keep_them(tmp_path):
    """DP-FTRL's node noise (and the server secret that keys sampling and noise) would let anyone
    holding state.pt subtract the noise from the released models. By default a finished run keeps only
    a stub that says it finished, and --resume says why it cannot continue; with
    run.keep_private_state = true the complete state stays and the run can be extended."""
    from fedemb.errors import ConfigError

    deleted = tmp_path / "deleted"
    run_in_process(deleted, *TREE)
    stub = torch.load(deleted / "checkpoints/state.pt", weights_only=False)
    assert stub == {"version": 1, "finished": True, "private_state_removed": True, "strategy": {"round": 2}}
    with pytest.raises(ConfigError, match="finished after round 2 and its server-private state was deleted"):
        run_in_process(deleted, *TREE, "run.rounds=3", resume=True)

    kept = tmp_path / "kept"
    run_in_process(kept, *TREE, "run.keep_private_state=true")
    state = torch.load(kept / "checkpoints/state.pt", weights_only=False)
    assert state["strategy"]["round"] == 2 and tensors_in(state["strategy"]["mechanism"]["tree"]["nodes"]) > 0
    results = run_in_process(kept, *TREE, "run.keep_private_state=true", "run.rounds=3", resume=True)
    assert results["rounds_completed"] == 3
    assert [(e["round"], e["attempt"]) for e in ledger_of(kept)["entries"]] == [(1, 0), (2, 0), (3, 0)]


# ---------------------------------------------------------------- the end of a run


def test_a_failing_optional_output_costs_only_itself(tmp_path, monkeypatch):
    """The projector fails (as it did on channels-last RGB data): the run still succeeds, with its
    results, ledger and final model written and the failure stated as a warning."""
    from torch.utils.tensorboard import SummaryWriter

    def broken_projector(*_, **__):
        raise ValueError("Input should be a 4D numpy array with 3 channels")

    monkeypatch.setattr(SummaryWriter, "add_embedding", broken_projector)
    results = run_in_process(tmp_path / "run", "run.rounds=2")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["rounds_completed"] == 2 and written == json.loads(json.dumps(results))
    assert written["warnings"] == ["the TensorBoard projector was not written (ValueError: Input should be a 4D numpy "
                                   "array with 3 channels); the run's results are complete"]
    assert len(json.loads((tmp_path / "run" / "privacy.json").read_text())["entries"]) == 2
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()


def test_a_run_that_crashes_after_training_is_finished_by_resume_without_retraining(tmp_path, monkeypatch):
    import simulations.run
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid

    trained = []

    def counting_train(msg, context):
        trained.append(msg.content["config"]["server-round"])
        return train(msg, context)

    class CountingGrid(InProcessGrid):
        def __init__(self, _train, nodes):
            super().__init__(counting_train, nodes)

    monkeypatch.setattr("simulations.inprocess.InProcessGrid", CountingGrid)
    real_write_json = simulations.run.write_json

    def crash_on_results(path, data):
        if Path(path).name == "results.json":
            raise MemoryError("the machine ran out of memory after the last round")
        real_write_json(path, data)

    monkeypatch.setattr(simulations.run, "write_json", crash_on_results)
    run_dir = tmp_path / "run"
    with pytest.raises(MemoryError):  # checkpoint_every = 0: no periodic checkpoint to fall back on
        run_in_process(run_dir, "run.rounds=3", "run.checkpoint_every=0")
    assert trained and max(trained) == 3 and not (run_dir / "results.json").exists()
    ledger = json.loads((run_dir / "privacy.json").read_text())

    monkeypatch.setattr(simulations.run, "write_json", real_write_json)
    trained.clear()
    results = run_in_process(run_dir, "run.rounds=3", "run.checkpoint_every=0", resume=True)
    assert trained == []  # nothing retrained
    assert results["rounds_completed"] == 3 and results["resumed"]
    assert json.loads((run_dir / "privacy.json").read_text()) == ledger  # nothing accounted again
    assert (run_dir / "results.json").is_file()
