"""Property tests of the privacy budget: over random (q, z, rounds, δ, target ε), the strategy's round
loop never records (so never runs) a release that takes ε past the target, and calibration reaches the
target from below within tolerance. A violation is a run that spends more privacy than it promised."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedemb.privacy.accountant import (PrivacyPlan, calibrate_accounting_z, calibrate_tree_z, epsilon_for,
                                       tree_epsilon_for)
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import SampledGaussian, TreeAggregation
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import UserSampler
from fedemb.privacy.tree_accountant import ParticipationLimits
from fedemb.protocol import read_train_message, train_reply
from flwr.app import ArrayRecord
from simulations.inprocess import InProcessGrid
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import ServerOptimizer
from fedemb.training.client_task import make_task
from tests.helpers import tiny_config

ANY_TASK = make_task(tiny_config(), num_classes=10, image_shape=(1, 8, 8), training_key=0)

STATE = {"w": torch.zeros(4)}


def zero_update_client(msg, context):
    """A node that trains nothing: it replies a valid, clipped (zero) update for what it was assigned.
    The budget is the server's decision; what the clients send does not enter it."""
    _, assignment = read_train_message(msg)
    n = len(assignment.virtual_clients)
    return train_reply(msg, {"w": torch.zeros(4)}, {"num-virtual-clients": n, "num-users": assignment.num_users,
                                                   "num-examples": 0, "num-nonfinite": 0, "num-clipped": 0,
                                                   "train-loss-sum": 0.0, "update-norms": [0.0] * n})


def run_rounds(mechanism, plan, rounds, target):
    ledger = PrivacyLedger(None, plan.delta, plan.accountant)
    strategy = DPFedEmb(sampler=UserSampler(0, plan.sampling_rate, 1, 5), user_ids=np.arange(50), task=ANY_TASK,
                        mechanism=mechanism, server_optimizer=ServerOptimizer(STATE, 1.0, 0.0), ledger=ledger,
                        target_epsilon=target)
    strategy.start(InProcessGrid(zero_update_client, 2), ArrayRecord(STATE), num_rounds=rounds)
    return strategy, ledger


budget_cases = st.tuples(st.floats(0.01, 1.0), st.floats(0.3, 5.0), st.integers(1, 25),
                         st.floats(1e-7, 1e-3), st.floats(0.1, 20.0))


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget_cases)
def test_no_round_past_the_target_is_ever_released(case):
    q, z, rounds, delta, target = case
    plan = PrivacyPlan("rdp", q, z, z, 1.0, delta, target)
    strategy, ledger = run_rounds(SampledGaussian(plan, 1.0, GaussianNoise(z, seed=0), 5), plan, rounds, target)
    assert all(e.epsilon <= target * (1 + 1e-9) for e in ledger.entries)
    allowed = max((r for r in range(rounds + 1) if epsilon_for("rdp", q, z, r, delta) <= target * (1 + 1e-9)),
                  default=0)
    assert strategy.rounds_completed == len(ledger.entries) == allowed  # and no affordable round was skipped
    if allowed < rounds:
        assert f"round {allowed + 1} not run" in strategy.stop_reason


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 12), st.integers(1, 3), st.floats(0.5, 10.0))
def test_no_tree_round_past_the_target_is_ever_released(rounds, separation, target):
    limits = ParticipationLimits(separation, 0)
    plan = PrivacyPlan("rdp", 1.0, 1.5, 1.5, 1.0, 1e-5, target, "tree", limits)
    strategy, ledger = run_rounds(TreeAggregation(plan, 1.0, GaussianNoise(1.5, seed=0)), plan, rounds, target)
    assert all(e.epsilon <= target * (1 + 1e-9) for e in ledger.entries)
    allowed = max((r for r in range(rounds + 1) if tree_epsilon_for("rdp", 1.5, r, 1e-5, limits) <= target * (1 + 1e-9)),
                  default=0)
    assert strategy.rounds_completed == allowed


@settings(max_examples=8, deadline=None)
@given(st.floats(0.005, 0.5), st.integers(1, 400), st.floats(1e-7, 1e-3), st.floats(0.5, 15.0))
@pytest.mark.slow
def test_calibrated_noise_spends_the_target_within_tolerance(q, rounds, delta, target):
    z = calibrate_accounting_z("rdp", target, delta, q, rounds)
    eps = epsilon_for("rdp", q, z, rounds, delta)
    assert target - 0.02 <= eps <= target + 1e-9


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 64), st.integers(1, 4), st.floats(0.5, 15.0))
def test_calibrated_tree_noise_spends_the_target_within_tolerance(rounds, separation, target):
    limits = ParticipationLimits(separation, 0)
    z = calibrate_tree_z("rdp", target, 1e-5, rounds, limits)
    eps = tree_epsilon_for("rdp", z, rounds, 1e-5, limits)
    assert eps <= target + 1e-9
    assert tree_epsilon_for("rdp", z * 0.99, rounds, 1e-5, limits) > target * 0.98  # not far from the target


def test_epsilon_in_the_results_is_the_ledger_epsilon(tmp_path):
    from fedemb.config import load_config
    from simulations.client_app import train
    from simulations.run import run_federated

    cfg = load_config(None, ['model.name="fedemb_lenet_small"', "model.embedding_dim=8", "data.num_users=60",
                             "sampling.rate=0.3", "sampling.users_per_client=2", "client.epochs=1", "run.rounds=3",
                             "run.seed=1", "run.eval_every=0"])
    results = run_federated(InProcessGrid(train, 2), cfg, tmp_path, show_progress=False)
    ledger = PrivacyLedger.load(tmp_path / "privacy.json")
    assert results["privacy"]["epsilon"] == pytest.approx(ledger.epsilon)
    assert len(ledger.entries) == 3 and [e.round for e in ledger.entries] == [1, 2, 3]
