"""Plays the public reader of a run's outputs: results.json, privacy.json, tensorboard/ and the console
may carry DP releases and data-independent facts only. Every exact statistic of a round (update norms,
clipped fraction, loss, users, examples, failures, timings) lives in the server-private private/ folder,
and the published files must not contain any of them."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedemb.config import load_config
from fedemb.federated import run_federated
from fedemb.inprocess import InProcessGrid
from fedemb.monitoring.outputs import PUBLIC_ROUND_METRICS
from fedemb.monitoring.telemetry import read_telemetry
from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.mechanisms import SampledGaussian
from fedemb.privacy.noise import GaussianNoise
from fedemb.protocol import read_train_message, train_reply
from fedemb.training.client_task import run_train_assignment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations/configs/quickstart.toml"
PUBLIC_HISTORY_KEYS = set(PUBLIC_ROUND_METRICS) | {"round", "eval"}


def train(msg, context):
    state, assignment = read_train_message(msg)
    update, metrics = run_train_assignment(state, assignment)
    return train_reply(msg, update, metrics)


def published_numbers(run_dir: Path) -> list[tuple[str, float]]:
    """Every number in the files a user would publish, with where it was found."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: list[tuple[str, float]] = []

    def walk(where, x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            found.append((where, float(x)))
        elif isinstance(x, str):
            try:
                found.append((where, float(x)))
            except ValueError:
                pass
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{where}.{k}", v)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(f"{where}[{i}]", v)

    for name in ("results.json", "privacy.json"):
        walk(name, json.loads((run_dir / name).read_text()))
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        found += [(f"tensorboard {tag}", e.value) for e in acc.Scalars(tag)]
    return found


def leaked_statistics(run_dir: Path, console: str) -> list[str]:
    """Exact private figures of the run (from its own telemetry) found in a published output."""
    private = [(r["round"], k, float(v)) for r in read_telemetry(run_dir) for k, v in r.items()
               if k not in PUBLIC_ROUND_METRICS and k not in ("round", "logged_at")
               and isinstance(v, (int, float)) and math.isfinite(v) and v != int(v)]
    published = published_numbers(run_dir)
    leaks = [f"round {rnd} {key} = {value!r} in {where}" for rnd, key, value in private
             for where, number in published if math.isclose(number, value, rel_tol=1e-6)]
    leaks += [f"round {rnd} {key} = {value!r} on the console" for rnd, key, value in private
              if f"{value:.4f}" in console or f"{value:.6g}" in console]
    results = json.loads((run_dir / "results.json").read_text())
    leaks += [f"results.json history holds {key}" for r in results["history"] for key in set(r) - PUBLIC_HISTORY_KEYS]
    leaks += [f"results.json holds {key}" for key in ("totals", "wall_seconds") if key in results]
    return leaks


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    import contextlib
    import io

    from rich.console import Console

    from fedemb import cli

    run_dir = tmp_path_factory.mktemp("quickstart")
    cfg = load_config(QUICKSTART, ["run.rounds=3", "run.eval_every=0", "privacy.metrics.enabled=true",
                                   "monitoring.private_tensorboard=true"])
    stream = io.StringIO()
    console, cli.console = cli.console, Console(file=stream)
    try:
        with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(stream):
            results = run_federated(InProcessGrid(train, num_nodes=2), cfg, run_dir, show_progress=True)
            cli._print_summary(results, run_dir)
    finally:
        cli.console = console
    return run_dir, results, stream.getvalue()


def test_the_quickstart_publishes_no_exact_round_statistic(quickstart_run):
    run_dir, results, console = quickstart_run
    telemetry = read_telemetry(run_dir)
    # the server did measure the exact figures, so there is something that could leak
    assert [r["round"] for r in telemetry] == [1, 2, 3]
    assert all(r["delta-norm-max"] > 0 and r["users"] > 0 and 0 < r["train-loss"] < 10 for r in telemetry)
    assert leaked_statistics(run_dir, console) == []
    # the published training curve is the DP one
    assert all(set(r) <= PUBLIC_HISTORY_KEYS and "dp-train-loss" in r for r in results["history"])
    assert "DP loss" in console and "never publish" in console


def test_the_leak_check_finds_an_exact_statistic_put_back_into_results(quickstart_run, tmp_path):
    run_dir, _, console = quickstart_run
    doctored = tmp_path / "doctored"
    shutil.copytree(run_dir, doctored)
    results = json.loads((doctored / "results.json").read_text())
    results["history"][1]["largest update"] = read_telemetry(doctored)[1]["delta-norm-max"]
    (doctored / "results.json").write_text(json.dumps(results))
    leaks = leaked_statistics(doctored, console + f" loss {read_telemetry(doctored)[2]['train-loss']:.4f}")
    assert any("delta-norm-max" in leak for leak in leaks)
    assert any("train-loss" in leak and "console" in leak for leak in leaks)


def test_server_private_outputs_are_marked_and_complete(quickstart_run):
    run_dir, results, _ = quickstart_run
    private = run_dir / "private"
    assert "never publish" in (private / "README.txt").read_text()
    summary = json.loads((private / "summary.json").read_text())
    assert summary["server_private"] is True
    assert summary["totals"]["virtual-clients-accepted"] == sum(r["virtual-clients-accepted"] for r in read_telemetry(run_dir))
    assert summary["wall_seconds"] > 0
    assert (private / "tensorboard").is_dir()  # asked for with monitoring.private_tensorboard
    assert "private/" in results["server_private"]


def test_dp_training_metrics_are_paid_for_inside_the_accounted_round():
    """The loss and clipped-count queries and the update are one Gaussian mechanism at the accountant's z:
    (S_Δ/σ_Δ)² + Σ (S_j/σ_j)² = 1/z², and the ledger entry is the one without metrics."""
    from fedemb.config import TrainingMetricsConfig

    for k_sensitivity in (1.0, 2.0):
        z, clip, clients = 0.9, 0.5, 50
        plan = PrivacyPlan("rdp", 0.1, z * k_sensitivity, z, k_sensitivity, 1e-5, 0.0)
        metrics = TrainingMetricsConfig(enabled=True, loss_bound=4.0)
        mech = SampledGaussian(plan, clip, GaussianNoise(0.0, seed=0), clients, metrics=metrics)
        plain = SampledGaussian(plan, clip, GaussianNoise(0.0, seed=0), clients)
        stds = {q.name: q.std for q in mech.queries}
        # by default each metric's noise is the cohort-sized one or, for this small cohort, the one that
        # takes 1% of the round's budget: (S/σ)² = 0.01 / z²
        assert stds == {"centred-unclipped": pytest.approx(max(clients / 20, k_sensitivity / 2 * z * 10)),
                        "centred-loss": pytest.approx(max(4.0 * clients / 40, k_sensitivity * 2.0 * z * 10))}
        assert (k_sensitivity * 2.0 / stds["centred-loss"]) ** 2 <= 0.01 / z ** 2 * (1 + 1e-9)
        joint = ((k_sensitivity * clip / mech.update_std) ** 2 + (k_sensitivity / 2 / stds["centred-unclipped"]) ** 2
                 + (k_sensitivity * 2.0 / stds["centred-loss"]) ** 2)
        assert joint == pytest.approx(1 / z ** 2, rel=1e-12)
        assert mech.update_std > plain.update_std
        assert mech.ledger_entry(3, 0).accounting == plain.ledger_entry(3, 0).accounting


def test_the_released_loss_and_clipped_fraction_are_noisy_estimates_of_the_truth():
    from fedemb.config import TrainingMetricsConfig

    plan = PrivacyPlan("rdp", 0.1, 1.0, 1.0, 1.0, 1e-5, 0.0)
    clients, bound = 40, 4.0
    mech = SampledGaussian(plan, 1.0, GaussianNoise(0.0, seed=3), clients,
                           metrics=TrainingMetricsConfig(enabled=True, loss_bound=bound))
    losses, fractions = [], []
    for _ in range(400):  # 40 virtual clients of loss 1.5, 10 of them clipped
        mech.privatize({"w": torch.zeros(2)}, centred_unclipped=30 - 20, centred_loss=40 * (1.5 - bound / 2))
        out = mech.round_metrics()
        losses.append(out["dp-train-loss"])
        fractions.append(out["dp-fraction-clipped"])
    assert sum(losses) / 400 == pytest.approx(1.5, abs=0.02)
    assert sum(fractions) / 400 == pytest.approx(0.25, abs=0.01)
    assert len(set(losses)) == 400  # noised every round, never the exact value
