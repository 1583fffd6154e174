"""Start-up (docs/performance.md, "Start-up"): a run starts its Ray while the driver imports Flower and
without a runtime environment; a sweep keeps one Ray warm for its runs, trains what each run alone
trains, and leaves no Ray behind, even when it is killed. scripts/benchmark_startup.py measures it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedemb.experiment_runner import starts_own_ray, train_command
from fedemb.experiments import load_spec
from fedemb.flower_env import local_ray_init_args, worker_pythonpath
from tests.helpers import assert_nothing_left, ray_like_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.rounds=1", "run.eval_every=0", "data.num_users=100", "client.epochs=1", 'simulation.engine="ray"']


def write_spec(tmp_path: Path, groups: str, seeds=(0,)) -> Path:
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'name = "sweep"\nconfig = "simulations/configs/quickstart.toml"\nseeds = {list(seeds)}\n'
                    f"set = {json.dumps(TINY)}\n" + textwrap.dedent(groups))
    return spec


def test_only_runs_that_would_start_their_own_local_ray_join_the_sweeps_warm_one(tmp_path, monkeypatch):
    import fedemb.flower_env

    monkeypatch.setattr(fedemb.flower_env.os, "cpu_count", lambda: 2)  # where auto weighs the run's length
    spec = write_spec(tmp_path, '''
        [[group]]
        label = "on ray"
        [[group]]
        label = "in process"
        set = ['simulation.engine="inprocess"']
        [[group]]
        label = "auto, short"
        set = ['simulation.engine="auto"']
        [[group]]
        label = "auto, long"
        set = ['simulation.engine="auto"', "run.rounds=2000"]
        [[group]]
        label = "on a cluster"
        set = ['simulation.ray_address="10.0.0.5:6379"']
        [[group]]
        label = "centralized"
        command = "centralized"
        ''')
    cells = {c.group: c for c in load_spec(spec, {}, ROOT, tmp_path / "runs").cells}
    assert {g: starts_own_ray(c) for g, c in cells.items()} == {
        "on ray": True, "in process": False, "auto, short": False, "auto, long": True, "on a cluster": False,
        "centralized": False}
    joined = train_command(cells["on ray"], "127.0.0.1:6380")
    assert joined[-2:] == ["--ray-address", "127.0.0.1:6380"] and "--ray-address" not in train_command(cells["on ray"])


def test_a_sweep_whose_ray_was_stopped_from_outside_starts_it_again_for_its_next_run(tmp_path, monkeypatch):
    """A run that joined a Ray stopped meanwhile (`ray stop` by someone else) would wait for it forever."""
    import fedemb.experiment_runner as runner

    started, closed = [], []

    class FakeWarmRay:
        def __init__(self, cwd):
            self.address, self.stopped = f"127.0.0.1:{6380 + len(started)}", False
            started.append(self)

        def alive(self):
            return not self.stopped

        def close(self):
            closed.append(self)

    monkeypatch.setattr(runner, "WarmRay", FakeWarmRay)
    cell = load_spec(write_spec(tmp_path, '[[group]]\nlabel = "on ray"\n'), {}, ROOT, tmp_path / "runs").cells[0]
    with runner.SweepRay(tmp_path) as ray:
        assert ray.address_for(cell) == ray.address_for(cell) == "127.0.0.1:6380"
        started[0].stopped = True
        assert ray.address_for(cell) == "127.0.0.1:6381" and closed == [started[0]]
    assert closed == started  # and the sweep's end stops the new one
    with runner.SweepRay(tmp_path, enabled=False) as ray:
        assert ray.address_for(cell) == "" and len(started) == 2  # --no-warm-ray: each run starts its own


def test_a_local_ray_has_no_runtime_environment_and_its_workers_import_what_the_driver_imports(monkeypatch):
    """A runtime environment (Flower's ray.init passes one, only for PYTHONPATH) makes Ray start every actor
    in a new worker through setup_worker.py; without it the actors take the workers Ray starts at once."""
    args = local_ray_init_args()
    assert "runtime_env" not in args and args["address"] == "local" and args["include_dashboard"] is False
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    with worker_pythonpath():
        path = os.environ["PYTHONPATH"].split(os.pathsep)
        assert path[:len(sys.path)] == sys.path and path[-1] == "/already/there"
    assert os.environ["PYTHONPATH"] == "/already/there"  # this process's environment as it was
    monkeypatch.delenv("PYTHONPATH")
    with worker_pythonpath():
        assert os.environ["PYTHONPATH"]
    assert "PYTHONPATH" not in os.environ


def test_a_ray_that_fails_to_start_fails_the_run_where_it_waits_for_it(monkeypatch):
    import ray

    from simulations.engine import RayStart

    def refuse(**kwargs):
        raise ConnectionError("no Ray here")

    monkeypatch.setattr(ray, "init", refuse)
    start = RayStart("10.0.0.5:6379")
    with pytest.raises(ConnectionError, match="no Ray here"):
        start.wait()
    start.close()
    assert not start._thread.is_alive()


def test_a_benchmark_writes_its_section_and_keeps_the_others(tmp_path):
    from fedemb.report.doc_sections import replace_section, write_section

    page = "# Simulation performance\n\n## Workload A\n\ntable A\n\n## Start-up\n\nold\n\n## Sampling a round\n\nsampling\n"
    new = replace_section(page, "## Start-up", "## Start-up\n\nnew\n")
    assert new == page.replace("old\n", "new\n")
    assert replace_section("# Simulation performance\n", "## Start-up", "## Start-up\n\nnew\n").endswith(
        "\n\n## Start-up\n\nnew\n")
    # a heading that only starts another one's name is not that section
    assert replace_section("## Start-up times\n\nkeep\n", "## Start-up", "## Start-up\n\nnew\n").startswith(
        "## Start-up times\n\nkeep\n")
    written = tmp_path / "performance.md"
    write_section(written, "## Start-up", "## Start-up\n\nfirst\n")
    write_section(written, "## Start-up", "## Start-up\n\nsecond\n")
    assert written.read_text() == "# Simulation performance\n\n## Start-up\n\nsecond\n"


@pytest.mark.integration
@pytest.mark.processes
def test_a_sweep_keeps_one_ray_warm_and_each_run_trains_what_it_trains_alone(tmp_path):
    before = ray_like_processes()
    spec = write_spec(tmp_path, '[[group]]\nlabel = "quickstart"\n', seeds=(0, 1))
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "fedemb", "experiments", "run", str(spec), "--runs", str(runs)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    log = (runs / "experiments.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    addresses = {line.split("--ray-address ")[1].split()[0] for line in log.splitlines() if line.startswith("$ ")}
    assert len(addresses) == 1 and log.count("--ray-address") == 2  # both runs joined the one warm Ray
    warm = sorted(p.parent for p in runs.rglob("results.json"))
    assert [json.loads((w / "results.json").read_text())["rounds_completed"] for w in warm] == [1, 1]

    alone = tmp_path / "alone"  # the second run (on a Ray that had already served one) started on its own
    sets = [a for s in TINY + ["run.seed=1"] for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "fedemb", "simulate", "-c", "simulations/configs/quickstart.toml",
                           *sets, "--run-dir", str(alone)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("checkpoints/final.pt", "privacy.json"):
        assert (warm[1] / name).read_bytes() == (alone / name).read_bytes(), name
    assert_nothing_left(before)


@pytest.mark.integration
@pytest.mark.processes
def test_a_sweep_killed_while_its_ray_is_warm_leaves_no_ray_behind(tmp_path):
    before = ray_like_processes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "from pathlib import Path; from fedemb.flower_env import WarmRay\n"
         "ray = WarmRay(Path('.'))\nprint(ray.address, flush=True)\nimport time; time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        host, _, port = holder.stdout.readline().strip().rpartition(":")
        assert host and port.isdigit()
        assert ray_like_processes() - before  # the warm Ray runs
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert_nothing_left(before)


def test_auto_engine_runs_in_process_only_on_a_small_machine_with_nothing_that_needs_ray():
    from fedemb.config import load_config
    from fedemb.flower_env import AUTO_RAY_MIN_PLANNED, resolved_engine

    auto = load_config(None, [])
    assert auto.simulation.engine == "auto"
    assert resolved_engine(auto, cpus=2) == "inprocess" and resolved_engine(auto, cpus=1) == "inprocess"
    assert resolved_engine(auto, cpus=4) == "ray"
    # a long run amortises Ray's start-up: 50 rounds of 1,000 virtual clients go to Ray; the quickstart
    # (40 rounds of about 112) stays in process
    assert resolved_engine(auto, cpus=2, planned_virtual_clients=50 * 1000) == "ray"
    assert resolved_engine(auto, cpus=2, planned_virtual_clients=40 * 112) == "inprocess"
    assert resolved_engine(auto, cpus=2, planned_virtual_clients=AUTO_RAY_MIN_PLANNED - 1) == "inprocess"
    assert resolved_engine(auto, cpus=2, planned_virtual_clients=AUTO_RAY_MIN_PLANNED) == "ray"
    assert resolved_engine(auto, ray_address="10.0.0.5:6379", cpus=2) == "ray"
    assert resolved_engine(load_config(None, ['simulation.ray_address="10.0.0.5:6379"']), cpus=2) == "ray"
    assert resolved_engine(load_config(None, ["simulation.gpus_per_client=0.5"]), cpus=2) == "ray"
    for chosen in ("ray", "inprocess"):
        assert resolved_engine(load_config(None, [f'simulation.engine="{chosen}"']), cpus=2 if chosen == "ray" else 64) == chosen
