"""A run that blows up says so, with the round it started, from published figures only."""

import json
import math

import pytest

from fedemb.monitoring.divergence import DivergenceWatch
from fedemb.monitoring.outputs import PUBLIC_ROUND_METRICS


def test_the_watch_names_the_first_round_whose_model_grew_past_the_factor_or_is_not_finite(caplog):
    watch = DivergenceWatch(initial_norm=2.0)
    for r, norm in enumerate([2.5, 40.0, 150.0, 900.0, 5000.0], start=1):  # 150 is 75 x: not yet
        watch.on_round_end(r, None, {"model-norm": norm}, None)
    assert watch.report["round"] == 4
    assert watch.report["reason"] == "the model's norm grew to 900, 450 times its initial 2"
    assert "training diverged in round 4" in caplog.text and caplog.text.count("training diverged") == 1
    nan = DivergenceWatch(initial_norm=2.0)
    nan.on_round_end(1, None, {"model-norm": math.nan}, None)
    assert nan.report["round"] == 1 and nan.report["reason"] == "the model is no longer finite"
    assert "model-norm" in PUBLIC_ROUND_METRICS  # the verdict rests on a published figure


@pytest.mark.slow
def test_a_diverging_run_reports_it_goes_on_and_still_reports_it_when_resumed(tmp_path, monkeypatch):
    import simulations.run
    from tests.test_published_outputs import tensorboard_texts
    from tests.test_resume_and_faults import run_in_process

    steep = ["run.rounds=3", "server.lr=3000", "server.momentum=0.9", "run.checkpoint_every=1"]
    results = run_in_process(tmp_path / "steep", *steep)
    written = json.loads((tmp_path / "steep" / "results.json").read_text())
    assert written["diverged"]["round"] >= 1 and "times its initial" in written["diverged"]["reason"]
    assert "server.lr" in written["diverged"]["advice"]
    assert all("model-norm" in r for r in written["history"])
    assert results["rounds_completed"] == 3  # reported, not stopped
    assert tensorboard_texts(tmp_path / "steep" / "tensorboard")["run/diverged"].startswith(
        f"round {written['diverged']['round']}: ")

    # the same run crashes after its last round and is resumed: the report is not forgotten
    real_write_json = simulations.run.write_json

    def crash_on_results(path, data):
        if path.name == "results.json":
            raise MemoryError("out of memory after the last round")
        real_write_json(path, data)

    monkeypatch.setattr(simulations.run, "write_json", crash_on_results)
    with pytest.raises(MemoryError):
        run_in_process(tmp_path / "crashed", *steep)
    monkeypatch.setattr(simulations.run, "write_json", real_write_json)
    resumed = run_in_process(tmp_path / "crashed", *steep, resume=True)
    assert resumed["resumed"] and resumed["diverged"] == written["diverged"]


@pytest.mark.slow
def test_a_model_that_is_no_longer_finite_stops_the_run(tmp_path, monkeypatch):
    import torch

    from strategies.server_optimizer import ServerOptimizer
    from tests.test_resume_and_faults import run_in_process

    honest_step = ServerOptimizer.step
    steps = []

    def step_that_overflows_in_round_2(self, mean_delta):
        state = honest_step(self, mean_delta)
        steps.append(1)
        return {k: torch.full_like(v, float("inf")) for k, v in state.items()} if len(steps) == 2 else state

    monkeypatch.setattr(ServerOptimizer, "step", step_that_overflows_in_round_2)
    broken = run_in_process(tmp_path / "broken", "run.rounds=4")
    assert broken["diverged"]["round"] == 2 and broken["diverged"]["reason"] == "the model is no longer finite"
    assert broken["rounds_completed"] == 2
    assert broken["stop_reason"] == "round 3 not run: the model is no longer finite (training diverged)"
    ledger = json.loads((tmp_path / "broken" / "privacy.json").read_text())
    assert len(ledger["entries"]) == 2  # no budget spent on a broken model
