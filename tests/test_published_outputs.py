"""Plays the public reader of a run's outputs: results.json, privacy.json, tensorboard/ and the console
may carry DP releases and data-independent facts only. Every exact statistic of a round (update norms,
clipped fraction, loss, users, examples, failures, timings) lives in the server-private private/ folder,
and the published files must not contain any of them."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedemb.config import load_config, to_toml
from fedemb.monitoring.outputs import PUBLIC_ROUND_METRICS
from fedemb.monitoring.telemetry import read_telemetry
from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.mechanisms import RoundCounts, SampledGaussian
from fedemb.privacy.noise import GaussianNoise
from fedemb.protocol import read_train_message, train_reply
from fedemb.training.client_task import run_train_assignment
from simulations.inprocess import InProcessGrid
from simulations.run import run_federated

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
    for tag, text in tensorboard_texts(run_dir / "tensorboard").items():
        found += [(f"tensorboard text {tag}", float(n)) for n in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]
    found += [(f"tensorboard hparams {k}", v) for k, v in tensorboard_hparams(run_dir / "tensorboard").items()
              if isinstance(v, float)]
    return found


def tensorboard_texts(log_dir: Path) -> dict[str, str]:
    """The text tab's entries: tag -> the latest text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag.removesuffix("/text_summary"): acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"}


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(path)).Load()


def tensorboard_hparams(log_dir: Path, metric_tags: list | None = None) -> dict:
    """The HParams entry's values (and, into metric_tags if given, the metrics it compares them on)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    values = {}
    for event in tensorboard_events(log_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name != "hparams":
                continue
            data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                for name, v in data.session_start_info.hparams.items():
                    values[name] = {"number_value": v.number_value, "string_value": v.string_value,
                                    "bool_value": v.bool_value}[v.WhichOneof("kind")]
            if data.HasField("experiment") and metric_tags is not None:
                metric_tags += [m.name.tag for m in data.experiment.metric_infos]
    return values


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

    from fedemb.cli import train as train_commands

    run_dir = tmp_path_factory.mktemp("quickstart")
    cfg = load_config(QUICKSTART, ["run.rounds=3", "run.eval_every=2", "privacy.metrics.enabled=true",
                                   "monitoring.private_tensorboard=true"])
    (run_dir / "config.toml").write_text(to_toml(cfg))
    stream = io.StringIO()
    console, train_commands.console = train_commands.console, Console(file=stream)
    try:
        with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(stream):
            results = run_federated(InProcessGrid(train, num_nodes=2), cfg, run_dir, show_progress=True)
            train_commands.print_run_summary(results, run_dir)
    finally:
        train_commands.console = console
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
        mech.privatize({"w": torch.zeros(2)}, RoundCounts(accepted=40, clipped=10, bounded_loss_sum=40 * 1.5))
        out = mech.round_metrics()
        losses.append(out["dp-train-loss"])
        fractions.append(out["dp-fraction-clipped"])
    assert sum(losses) / 400 == pytest.approx(1.5, abs=0.02)
    assert sum(fractions) / 400 == pytest.approx(0.25, abs=0.01)
    assert len(set(losses)) == 400  # noised every round, never the exact value


def test_tensorboard_shows_the_watched_curves_first_and_the_constants_once_as_text(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedemb.monitoring.tensorboard import HPARAM_METRICS

    run_dir, results, _ = quickstart_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    groups = sorted({tag.split("/")[0] for tag in acc.Tags()["scalars"]})
    assert groups == ["1_training", "2_evaluation", "3_privacy"]  # TensorBoard orders groups by name
    assert acc.Tags()["scalars"] and "3_privacy/clip_norm" not in acc.Tags()["scalars"]  # fixed clipping: text
    assert [e.step for e in acc.Scalars("2_evaluation/recall_at_1")] == [0, 2, 3]

    texts = tensorboard_texts(run_dir / "tensorboard")
    config_lines = [line.strip() for line in (run_dir / "config.toml").read_text().splitlines() if line.strip()]
    assert [line.strip() for line in texts["run/config"].splitlines() if line.strip()] == config_lines
    privacy = results["privacy"]
    assert f"| privacy.delta | {privacy['delta']} |" in texts["run/privacy"]
    assert "| privacy.unit | user |" in texts["run/privacy"]
    assert f"| privacy.clip_norm (C) | {privacy['clip_norm']} |" in texts["run/privacy"]
    assert f"| ε | {privacy['epsilon']:.4g} |" in texts["run/summary"]
    assert "| rounds | 3 of 3 (completed) |" in texts["run/summary"]

    metrics: list[str] = []
    hparams = tensorboard_hparams(run_dir / "tensorboard", metrics)
    assert metrics == list(HPARAM_METRICS) and set(metrics) <= set(acc.Tags()["scalars"])
    assert hparams["privacy.delta"] == pytest.approx(privacy["delta"]) and hparams["sampling.rate"] == 0.1
    assert hparams["privacy.unit"] == "user" and hparams["model.name"] == "fedemb_lenet_small"
    assert hparams["run.eval_every"] == 2  # changed from the built-in default, so compared
    assert "client.batch_size" in hparams and "data.split_seed" not in hparams  # changed by the quickstart; not


def test_tensorboard_images_are_held_out_users_and_training_images_stay_private(quickstart_run):
    """The published grid is rebuilt exactly from the held-out split; the training split's grid is only in
    the server-private log."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedemb.data.store import load_splits
    from fedemb.monitoring.image_grid import class_rows, sample_by_class

    run_dir, _, _ = quickstart_run
    splits = load_splits(load_config(run_dir / "config.toml").data)

    def decoded(log_dir: Path, tag: str) -> np.ndarray:
        from PIL import Image
        import io

        acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
        acc.Reload()
        return np.asarray(Image.open(io.BytesIO(acc.Images(tag)[0].encoded_image_string)).convert("L"), dtype=np.float32) / 255

    def expected(pop) -> np.ndarray:
        return class_rows(*sample_by_class(pop))[0].numpy()

    public = decoded(run_dir / "tensorboard", "2_evaluation/held_out_inputs_one_class_per_row")
    np.testing.assert_allclose(public, expected(splits.eval), atol=1.5 / 255)
    training = expected(splits.train)
    assert public.shape != training.shape or not np.allclose(public, training, atol=1.5 / 255)
    private = decoded(run_dir / "private" / "tensorboard", "server-private/training_inputs_one_class_per_row")
    np.testing.assert_allclose(private, expected(splits.train), atol=1.5 / 255)


def test_the_projector_has_every_evaluation_with_class_and_user(quickstart_run):
    import numpy as np

    from fedemb.data.store import load_splits

    run_dir, _, _ = quickstart_run
    board = run_dir / "tensorboard"
    config = (board / "projector_config.pbtxt").read_text()
    # the projector opens the alphabetically first tensor: the latest evaluation
    assert re.findall(r'tensor_name: "(held_out_users [^"]+)"', config) == [
        "held_out_users (round 0)", "held_out_users (round 2)", "held_out_users (latest: round 3)"]
    assert sorted(re.findall(r'tensor_name: "([^"]+)"', config))[0] == "held_out_users (latest: round 3)"
    eval_pop = load_splits(load_config(run_dir / "config.toml").data).eval
    rows = (board / "00003" / "held_out_users" / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "class\tuser" and len(rows) - 1 == len(eval_pop)
    assert rows[1:] == [f"{int(c)}\t{int(u)}" for c, u in zip(eval_pop.labels, eval_pop.users)]
    first = np.loadtxt(board / "00000" / "held_out_users" / "tensors.tsv", delimiter="\t")
    last = np.loadtxt(board / "00003" / "held_out_users" / "tensors.tsv", delimiter="\t")
    assert first.shape == last.shape and not np.allclose(first, last)  # the untrained and the trained model
