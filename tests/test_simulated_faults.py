"""Simulated faults cost what they simulate (simulation.faults, fedemb/training/faults.py).

- A virtual client that raises, times out or drops costs itself only: its worker replies the clipped
  sum of the others and counts it, by kind.
- A simulated node fault is, to the server, exactly a reply that missed the deadline (its virtual
  clients count as missing), yet nobody waits for it: no sleep, nothing left for a later round.
- Faults change neither M, nor the noise, nor ε.
- The exact counts stay server-private: the private log and summary name the rounds that lost most
  of their cohort, while results.json (what a reader of the run sees) says only what the configured
  rates imply, and would read the same had other virtual clients failed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import fedemb.training.client_task as client_task
from fedemb.config import FaultConfig
from fedemb.protocol import TrainAssignment, simulated_fault, simulated_fault_reply, train_message, train_reply
from fedemb.training.faults import expected_accepted_fraction, node_fault, virtual_client_fault
from simulations.inprocess import InProcessGrid
from strategies.reply_collection import send_and_collect
from tests.helpers import tiny_config
from tests.test_client_reply import setup_message
from tests.test_resume_and_faults import run_in_process
from tests.test_strategy_arithmetic import STATE, make_strategy, new_state, reply

VC_FAULTS = ["simulation.faults.timeout_rate=0.15", "simulation.faults.drop_rate=0.15"]
NODE_FAULTS = ["simulation.faults.node_timeout_rate=0.25", "simulation.faults.node_drop_rate=0.25"]


@pytest.fixture
def sleeps(monkeypatch):
    """Every time.sleep of this test's thread (where the strategy and the in-process nodes run)."""
    import time

    calls, real_sleep, me = [], time.sleep, threading.get_ident()

    def recording_sleep(seconds):
        if threading.get_ident() == me:
            calls.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", recording_sleep)
    return calls


# ---------------------------------------------------------------- on the node


def test_timed_out_and_dropped_virtual_clients_cost_only_themselves_and_are_counted_by_kind(monkeypatch, sleeps):
    cfg = tiny_config()
    state, everyone = setup_message(cfg, clip=1.0, users_per_vc=((0, 1), (2, 3), (4, 5), (6, 7)))
    healthy = TrainAssignment(everyone.server_round, everyone.clip_norm, everyone.task,
                              [vc for vc in everyone.virtual_clients if vc[0] in (1, 3)])
    expected, _ = client_task.run_train_assignment(state, healthy)
    kinds = {0: "timeout", 2: "drop"}
    monkeypatch.setattr(client_task, "virtual_client_fault", lambda faults, key, rnd, slot: kinds.get(slot))
    total, metrics = client_task.run_train_assignment(state, everyone)
    assert metrics["num-virtual-clients"] == 4 and metrics["num-users"] == 8
    assert (metrics["num-timed-out"], metrics["num-dropped"], metrics["num-failed"]) == (1, 1, 0)
    assert len(metrics["update-norms"]) == 2
    assert all(torch.equal(total[k], expected[k]) for k in expected)  # the worker's other clients are kept
    assert sleeps == []  # a simulated late or silent client costs no waiting


def test_fault_draws_are_keyed_and_their_rates_hold():
    faults = FaultConfig(timeout_rate=0.15, drop_rate=0.15, node_timeout_rate=0.1, node_drop_rate=0.2)
    draws = [virtual_client_fault(faults, 7, 1, slot) for slot in range(4000)]
    assert draws == [virtual_client_fault(faults, 7, 1, slot) for slot in range(4000)]
    assert draws.count("timeout") / 4000 == pytest.approx(0.15, abs=0.025)
    assert draws.count("drop") / 4000 == pytest.approx(0.15, abs=0.025)
    assert {"raise", "nan"}.isdisjoint(draws)
    nodes = [node_fault(faults, 7, r, [3, 9]) for r in range(4000)]
    assert nodes.count("node-timeout") / 4000 == pytest.approx(0.1, abs=0.025)
    assert nodes.count("node-drop") / 4000 == pytest.approx(0.2, abs=0.025)
    assert node_fault(faults, 7, 1, []) is None and node_fault(FaultConfig(), 7, 1, [3]) is None
    assert expected_accepted_fraction(FaultConfig(timeout_rate=0.15, drop_rate=0.15), 56) == pytest.approx(0.7)


def test_a_node_fault_replies_at_once_with_a_marker_instead_of_training(monkeypatch, flower_identity, sleeps):
    from flwr.app import Context, RecordDict

    from simulations.client_app import train

    monkeypatch.setattr("simulations.client_app.run_train_assignment", lambda *a, **k: pytest.fail("a faulty node trained"))
    state, assignment = setup_message(tiny_config("simulation.faults.node_drop_rate=1.0"), clip=1.0)
    answer = train(train_message(state, assignment, dst_node_id=3),
                   Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={}))
    assert simulated_fault(answer) == "node-drop" and sleeps == []


# ---------------------------------------------------------------- on the server


class SilentGrid(InProcessGrid):
    """An in-process grid whose node `silent` runs but whose reply never comes back (a real lost node)."""

    def __init__(self, train, num_nodes, silent):
        super().__init__(train, num_nodes)
        self.silent, self.sent_to = silent, {}

    def push_messages(self, messages):
        ids = list(super().push_messages(messages))
        self.sent_to.update({mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages)})
        return ids

    def pull_messages(self, message_ids):
        return super().pull_messages([m for m in message_ids if self.sent_to.get(m) != self.silent])


def round_through(grid_class, answers, timeout_s, **grid_args):
    """One round of a strategy with node 1 assigned 2 virtual clients and node 2 assigned 3, its
    messages answered by answers[node] through a grid of `grid_class`."""
    strategy = make_strategy(slots=5)
    strategy.assignments = {n: TrainAssignment(1, strategy.clip_norm, strategy.task,
                                               [(n * 10 + j, (j,)) for j in range(c)]) for n, c in ((1, 2), (2, 3))}
    strategy.sent = [train_message(STATE, a, node) for node, a in strategy.assignments.items()]
    grid = grid_class(lambda msg, context: answers[msg.metadata.dst_node_id](msg), 2, **grid_args)
    replies = send_and_collect(grid, strategy.sent, server_round=1, timeout_s=timeout_s, progress_every_s=60,
                               poll_s=0.01)
    return replies, *strategy.aggregate_train(1, replies)


def test_a_simulated_node_fault_is_a_missing_reply_to_the_server_and_nobody_waits(flower_identity, sleeps, caplog):
    node_1 = lambda msg: reply(msg, 0.1, 0.2, 2)  # noqa: E731
    honest_late = lambda msg: reply(msg, 0.3, 0.3, 3)  # noqa: E731
    replies, arrays, metrics = round_through(
        InProcessGrid, {1: node_1, 2: lambda msg: simulated_fault_reply(msg, "node-timeout")}, timeout_s=600)
    assert [r.metadata.src_node_id for r in replies] == [1]  # the marker was taken as too late, at once
    assert sleeps == []  # a 600 s deadline, and nobody waited
    assert "node 2: simulated node-timeout" in caplog.text and "node 2 did not reply in time" in caplog.text

    # the same round with a real node 2 whose reply does not come before the deadline
    _, real_arrays, real_metrics = round_through(SilentGrid, {1: node_1, 2: honest_late}, timeout_s=0.05, silent=2)
    assert sleeps  # the real deadline was waited for
    assert metrics == real_metrics and metrics["virtual-clients-missing"] == 3
    assert all(torch.equal(new_state(arrays)[k], new_state(real_arrays)[k]) for k in STATE)


@pytest.mark.parametrize("lost,accepted,rejected", [((1, 1, 0), 1, 0), ((1, 1, 1), 0, 0), ((1, 2, 1), 0, 3), ((0, -1, 0), 0, 3),
                                                    ((0, 0.5, 0), 0, 3)])
def test_counted_losses_leave_a_reply_and_impossible_ones_reject_it(flower_identity, lost, accepted, rejected):
    timed_out, dropped, failed = lost
    s = make_strategy(clip=1.0)
    s.assignments = {0: TrainAssignment(1, s.clip_norm, s.task, [(j, (j,)) for j in range(3)])}
    msg = train_message(STATE, s.assignments[0], 0)
    partly = train_reply(msg, {"a": torch.zeros(2, 2), "b": torch.zeros(3)},
                         {"num-virtual-clients": 3, "num-users": 3, "num-examples": 1, "num-nonfinite": 0,
                          "num-clipped": 0, "num-failed": failed, "num-timed-out": timed_out, "num-dropped": dropped,
                          "train-loss-sum": 0.0, "update-norms": [0.0]})
    _, metrics = s.aggregate_train(1, [partly])
    assert metrics["virtual-clients-accepted"] == accepted and metrics["virtual-clients-rejected"] == rejected
    if not rejected:
        assert (metrics["virtual-clients-timed-out"], metrics["virtual-clients-dropped"]) == (timed_out, dropped)


def test_a_reply_is_held_to_the_clip_norm_of_the_virtual_clients_it_sums(flower_identity):
    """Three assigned, two counted lost: the sum is of one clipped update, so at most 1 x C."""
    s = make_strategy(clip=1.0)
    s.assignments = {0: TrainAssignment(1, s.clip_norm, s.task, [(j, (j,)) for j in range(3)])}
    msg = train_message(STATE, s.assignments[0], 0)
    two_cs = train_reply(msg, {"a": torch.full((2, 2), 0.75), "b": torch.zeros(3)},  # norm 1.5
                         {"num-virtual-clients": 3, "num-users": 3, "num-examples": 1, "num-nonfinite": 0,
                          "num-clipped": 0, "num-timed-out": 1, "num-dropped": 1, "train-loss-sum": 0.0,
                          "update-norms": [1.5]})
    _, metrics = s.aggregate_train(1, [two_cs])
    assert metrics["virtual-clients-rejected"] == 3 and metrics["virtual-clients-accepted"] == 0


# ---------------------------------------------------------------- whole runs (in process)


def private_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "private" / "summary.json").read_text())


def test_faults_change_neither_the_denominator_nor_the_noise_nor_epsilon(tmp_path, sleeps):
    clean = run_in_process(tmp_path / "clean")
    faulty = run_in_process(tmp_path / "faulty", *VC_FAULTS, *NODE_FAULTS)
    ledger = lambda name: json.loads((tmp_path / name / "privacy.json").read_text())  # noqa: E731
    assert [{k: v for k, v in e.items() if k != "release_sha256"} for e in ledger("faulty")["entries"]] == \
           [{k: v for k, v in e.items() if k != "release_sha256"} for e in ledger("clean")["entries"]]
    assert faulty["privacy"] == clean["privacy"]
    assert [r["denominator"] for r in faulty["history"]] == [r["denominator"] for r in clean["history"]]
    assert [r["noise-std"] for r in faulty["history"]] == [r["noise-std"] for r in clean["history"]]
    totals = private_summary(tmp_path / "faulty")["totals"]
    assert totals["virtual-clients-timed-out"] > 0 and totals["virtual-clients-dropped"] > 0
    assert totals["virtual-clients-missing"] > 0  # the node faults
    assert 0 < totals["virtual-clients-accepted"] < private_summary(tmp_path / "clean")["totals"]["virtual-clients-accepted"]
    assert sleeps == []  # nothing waited for a simulated deadline


LOSSY = ["simulation.faults.timeout_rate=0.4", "simulation.faults.drop_rate=0.3", "run.rounds=3"]


def test_the_private_log_names_the_rounds_that_lost_most_of_their_cohort(tmp_path):
    run_dir = tmp_path / "run"
    results = run_in_process(run_dir, *LOSSY)
    lossy = private_summary(run_dir)["rounds_losing_most_of_their_cohort"]
    assert [r["round"] for r in lossy] == [1, 2, 3]
    assert all(r["accepted"] < r["planned"] / 2 and r["virtual-clients-timed-out"] > 0 for r in lossy)
    events = (run_dir / "private" / "events.log").read_text()
    for r in lossy:
        assert (f"round {r['round']} lost most of its cohort: {r['accepted']} of {r['planned']} planned "
                "virtual clients accepted") in events
    # the public side says what the configuration implies, before any round
    notice = results["fault_injection"]
    assert notice["loses_most_of_each_round"] and notice["expected_accepted_fraction"] == pytest.approx(0.3)
    assert notice["notice"].startswith("most of each round's cohort will be lost")


def every_value(x, where="results.json"):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from every_value(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from every_value(v, f"{where}[{i}]")
    else:
        yield where, x


# figures of the released model (DP releases and post-processing of them, evaluations of it)
MODEL_DEPENDENT = ("results.json.final.", ".model-norm", ".dp-train-loss", ".dp-fraction-clipped", ".eval.")


def test_results_json_reads_the_same_whichever_virtual_clients_failed(tmp_path, monkeypatch):
    """The reader of results.json: two runs of one config whose faults hit other virtual clients (so
    their exact accepted counts differ) publish the same results.json but for the released model's
    figures, and no exact count appears in it, in numbers or in words."""
    from fedemb.monitoring.metric_names import ROUND_TOTALS

    first = run_in_process(tmp_path / "first", *LOSSY)
    real_draw = client_task.virtual_client_fault
    monkeypatch.setattr(client_task, "virtual_client_fault",
                        lambda faults, key, rnd, slot: real_draw(faults, key + 1, rnd, slot))
    second = run_in_process(tmp_path / "second", *LOSSY)
    counts = [private_summary(tmp_path / name)["rounds_losing_most_of_their_cohort"] for name in ("first", "second")]
    assert counts[0] != counts[1]  # the exact counts differ, so there is something that could show

    a, b = dict(every_value(first)), dict(every_value(second))
    assert a.keys() == b.keys()
    differ = [where for where in a if a[where] != b[where]]
    assert differ and all(any(part in where for part in MODEL_DEPENDENT) for where in differ), differ

    written = (tmp_path / "first" / "results.json").read_text()
    assert not [name for name in ROUND_TOTALS if "-" in name and name in written]
    exact = {str(r[key]) for r in counts[0] for key in r if key != "round"}
    words = " ".join(v for _, v in every_value(first) if isinstance(v, str))
    assert not [n for n in exact if f" {n} " in f" {words} "], words
