"""The Python API for launcher scripts (fedemb.cli.api, docs/api.md): the example launcher sweeps a
parameter and prints one line per run, and every call returns its typed result, read from what the run
published (results.json, privacy.json), with bad requests refused as one-line FedembErrors."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedemb.cli import api
from fedemb.errors import FedembError
from tests.helpers import die_at_server_step

REPO = Path(__file__).resolve().parents[1]
SMALL = ['model.name="fedemb_lenet_small"', "model.embedding_dim=8", "data.num_users=100", "sampling.rate=0.3",
         "sampling.users_per_client=1", "client.epochs=1", "run.rounds=2", "run.seed=1", "run.eval_every=0",
         "run.checkpoint_every=1", "simulation.engine=inprocess"]
FAST_GMM = ["synth.seed=0", "synth.clusters=1", "synth.epsilon=1", "synth.mlp_epochs=5", "synth.probe_epochs=3",
            "synth.samples_per_class=100"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[api.RunResult, list[api.RunPlan], list[object]]:
    """A 2-round run through the API; the plan it announced; the setups prepare_run built for it."""
    import fedemb.run_setup
    import simulations.run

    plans: list[api.RunPlan] = []
    prepared: list[object] = []

    def counted(cfg, prepare=fedemb.run_setup.prepare_run):
        prepared.append(prepare(cfg))
        return prepared[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fedemb.run_setup, "prepare_run", counted)
        patch.setattr(simulations.run, "prepare_run", counted)
        run = api.simulate(api.load_config(None, SMALL), tmp_path_factory.mktemp("api") / "run", show_progress=False,
                           on_start=plans.append)
    return run, plans, prepared


@pytest.mark.slow
def test_the_example_launcher_runs_one_simulation_per_clip_norm_and_prints_a_line_for_each(tmp_path):
    script = REPO / "scripts" / "examples" / "sweep_clip_norm.py"
    done = subprocess.run([sys.executable, str(script), "run.rounds=1", "simulation.engine=inprocess",
                           "data.num_users=200", "client.epochs=1"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    for line, clip_norm in zip(lines, ("0.2", "0.4")):
        found = re.fullmatch(r"clip_norm=(\S+) recall@1=(\d\.\d{3}) epsilon=(\d+\.\d\d) (\S+)", line)
        assert found and found[1] == clip_norm, line
        run = api.RunResult.read(found[4])  # the line reports the run it names
        assert run.run_dir.parent == tmp_path / "runs" and run.rounds_completed == 1
        assert float(found[2]) == pytest.approx(run.final["recall_at_1"], abs=5e-4)
        assert float(found[3]) == pytest.approx(run.epsilon, abs=5e-3)
        assert api.load_config(run.run_dir / "config.toml").privacy.clip_norm == float(clip_norm)


def test_the_docs_show_the_example_launcher_as_it_is_and_it_is_about_ten_lines():
    script = (REPO / "scripts" / "examples" / "sweep_clip_norm.py").read_text()
    docstring_end = ast.parse(script).body[0].end_lineno
    code = "\n".join(script.splitlines()[docstring_end:]).strip()
    assert code in (REPO / "docs" / "api.md").read_text()
    assert len(code.splitlines()) <= 10


@pytest.mark.slow
def test_simulate_returns_what_the_run_published_and_announces_its_plan_first(finished):
    run, plans, prepared = finished
    results = json.loads((run.run_dir / "results.json").read_text())
    ledger = json.loads((run.run_dir / "privacy.json").read_text())
    assert isinstance(run, api.RunResult) and run.results == results
    assert (run.rounds_planned, run.rounds_completed, run.stop_reason) == (2, 2, "completed")
    assert run.final == results["final"] and set(run.final) >= {"recall_at_1", "tar_at_far_1e-3", "tar_at_far_1e-1"}
    assert run.epsilon == results["privacy"]["epsilon"] == ledger["epsilon"] == run.ledger_epsilon > 0
    assert (run.delta, run.unit, run.diverged, run.resumed, run.warnings) == (ledger["delta"], "user", None, False, ())
    assert run.checkpoint == run.run_dir / "checkpoints" / "final.pt" and run.checkpoint.is_file()
    [plan] = plans
    assert isinstance(plan, api.RunPlan) and plan.run_dir == run.run_dir and not plan.resumed
    assert plan.virtual_clients == results["privacy"]["virtual_clients_per_round"]
    assert (plan.noise_multiplier, plan.delta) == (run.noise_multiplier, run.delta)
    assert len(prepared) == 1, "the data, model and privacy plan are set up once and handed to the run driver"
    with pytest.raises(FedembError, match="already holds a run"):  # a second run never overwrites a ledger
        api.simulate(api.load_config(None, SMALL), run.run_dir, show_progress=False)


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_same_model_and_ledger(finished, tmp_path, monkeypatch):
    from strategies.server_optimizer import ServerOptimizer

    uninterrupted = finished[0]
    honest_step = die_at_server_step(monkeypatch, 2)
    with pytest.raises(SystemExit):
        api.simulate(api.load_config(None, SMALL), tmp_path / "killed", show_progress=False)
    assert (tmp_path / "killed" / "checkpoints" / "state.pt").is_file()
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(ServerOptimizer, "step", honest_step)
    plans: list[api.RunPlan] = []
    run = api.resume(tmp_path / "killed", show_progress=False, on_start=plans.append)
    assert isinstance(run, api.RunResult) and run.resumed and plans[0].resumed
    assert run.rounds_completed == 2 and run.final == uninterrupted.final and run.epsilon == uninterrupted.epsilon
    model, expected = torch.load(run.checkpoint), torch.load(uninterrupted.checkpoint)
    assert all(torch.equal(model[k], expected[k]) for k in expected), "the resumed model differs"
    assert (json.loads((run.run_dir / "privacy.json").read_text())
            == json.loads((uninterrupted.run_dir / "privacy.json").read_text()))


@pytest.mark.slow
def test_account_gives_the_epsilon_the_configs_run_spends(finished):
    run = finished[0]
    accounting = api.account(api.load_config(None, SMALL))
    assert isinstance(accounting, api.Accounting)
    assert accounting.epsilon == pytest.approx(run.epsilon)
    assert accounting.delta == pytest.approx(run.delta) and accounting.rounds == 2
    assert accounting.virtual_clients == run.results["privacy"]["virtual_clients_per_round"]
    assert accounting.population == run.results["privacy"]["population"]
    explicit = api.account_parameters(sampling_rate=accounting.sampling_rate, rounds=2, delta=accounting.delta,
                                      noise_multiplier=accounting.noise_multiplier, users_per_client=1)
    assert explicit.epsilon == pytest.approx(accounting.epsilon)
    calibrated = api.account(api.load_config(None, SMALL), target_epsilon=2 * run.epsilon)
    assert calibrated.epsilon == pytest.approx(2 * run.epsilon, rel=0.01)
    assert calibrated.noise_multiplier < accounting.noise_multiplier


@pytest.mark.slow
def test_synthesize_adds_its_release_to_the_runs_ledger_and_report_reads_the_run(finished, tmp_path):
    run_dir = shutil.copytree(finished[0].run_dir, tmp_path / "run")
    trained = api.RunResult.read(run_dir)
    synth = api.synthesize(run_dir, "gmm", overrides=FAST_GMM, baselines=False, out=run_dir / "synth" / "gmm")
    assert isinstance(synth, api.SynthesisResult) and synth.kind == "gmm" and synth.out == run_dir / "synth" / "gmm"
    assert synth.results == {**json.loads((synth.out / "synth_results.json").read_text()), "out": str(synth.out)}
    assert synth.epsilon == pytest.approx(1.0, rel=0.01) and 0 <= synth.accuracy <= 1
    after = api.RunResult.read(run_dir)  # the run's published training results stay; its ledger grew
    assert after.epsilon == trained.epsilon and synth.ledger_epsilon == after.ledger_epsilon > trained.ledger_epsilon

    shown = api.report(tmp_path, tmp_path / "report")
    assert isinstance(shown, api.ReportResult) and shown.report == tmp_path / "report" / "report.md"
    assert shown.runs == (run_dir,) and len(shown.points) == 1 and shown.points_file.is_file()
    assert shown.figures and all(f.is_file() and f.suffix == ".png" for f in shown.figures)


def test_bad_requests_are_refused_as_one_line_errors_before_anything_runs(tmp_path):
    for call, message in [
        (lambda: api.resume(tmp_path), "is not a run directory"),
        (lambda: api.synthesize(tmp_path, "mixture"), "kind must be one of gmm, invert, custom"),
        (lambda: api.synthesize(tmp_path, "invert", epsilons=[1.0]), "epsilons is an option of synthesis kind gmm"),
        (lambda: api.synthesize(tmp_path / "absent"), "run directory not found"),
        (lambda: api.account_parameters(sampling_rate=2.0, rounds=1, delta=1e-5, noise_multiplier=1.0),
         r"sampling rate must be in \(0, 1\]"),
        (lambda: api.load_config(None, {"privacy.clip_norm": "wide"}), "clip_norm"),
    ]:
        with pytest.raises(FedembError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
