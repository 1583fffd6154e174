"""DP-FTRL: the tree's noise, its accountant, and the sampler that enforces what the accountant is told.
An accountant that undercounts a participation pattern the sampler allows understates ε."""

import itertools
import math

import numpy as np
import pytest
import torch

from fedemb.privacy.accountant import tree_epsilon_for
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import LimitedParticipationSampler
from fedemb.privacy.tree_accountant import (ParticipationLimits, max_sensitivity_squared, prefix_node_count)
from fedemb.privacy.tree_noise import TreeNoise


def released_nodes(rounds: int, restart_every: int = 0):
    """Every dyadic node completed by `rounds`, as (first, last) rounds, per tree of the forest."""
    segment = restart_every or rounds
    nodes = []
    for start in range(0, rounds, segment):
        length = min(segment, rounds - start)
        level = 0
        while (1 << level) <= length:
            size = 1 << level
            nodes += [(start + j * size + 1, start + (j + 1) * size) for j in range(length // size)]
            level += 1
    return nodes


def brute_force_sensitivity(rounds, limits, restart_every=0):
    nodes = released_nodes(rounds, restart_every)
    best = 0
    cap = limits.max_participations or rounds
    for p in range(1, cap + 1):
        for pattern in itertools.combinations(range(1, rounds + 1), p):
            if any(b - a < limits.min_separation for a, b in zip(pattern, pattern[1:])):
                continue
            best = max(best, sum(sum(1 for t in pattern if lo <= t <= hi) ** 2 for lo, hi in nodes))
    return best


@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 7, 8, 11])
@pytest.mark.parametrize("limits", [ParticipationLimits(1, 0), ParticipationLimits(1, 2), ParticipationLimits(2, 0),
                                    ParticipationLimits(3, 2), ParticipationLimits(1, 1)])
def test_tree_sensitivity_never_undercounts_any_allowed_participation_pattern(rounds, limits):
    exact = brute_force_sensitivity(rounds, limits)
    bound = max_sensitivity_squared(rounds, limits)
    assert bound >= exact
    if limits.min_separation == 1:  # the only relaxation is of the separation: without one it is exact
        assert bound == exact


@pytest.mark.parametrize("rounds,restart", [(6, 2), (7, 3), (9, 4)])
def test_restarted_trees_compose_over_the_participations_of_one_user(rounds, restart):
    for limits in (ParticipationLimits(1, 0), ParticipationLimits(2, 3)):
        exact = brute_force_sensitivity(rounds, limits, restart)
        bound = max_sensitivity_squared(rounds, limits, restart)
        assert bound >= exact
        if limits.min_separation == 1:
            assert bound == exact


def test_one_participation_costs_one_root_to_leaf_path():
    limits = ParticipationLimits(1, 1)
    assert max_sensitivity_squared(16, limits) == 5  # leaf + 4 ancestors
    assert max_sensitivity_squared(15, limits) == 4  # the root of 16 is not complete yet


def test_tree_epsilon_is_the_gaussian_mechanism_with_the_tree_sensitivity():
    limits = ParticipationLimits(4, 0)
    eps = tree_epsilon_for("rdp", 2.0, 20, 1e-5, limits)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(2.0 / math.sqrt(max_sensitivity_squared(20, limits)), 1.0, 1)]
    assert eps == pytest.approx(acc.get_epsilon(1e-5))
    assert tree_epsilon_for("rdp", 2.0, 20, 1e-5, ParticipationLimits(1, 0)) > eps  # more participation, more ε


def test_prefix_noise_has_the_variance_the_tree_implies():
    """The noise on the prefix sum after t rounds is the sum of popcount(t) independent nodes."""
    std, dim, rounds = 0.7, 200_000, 13
    tree = TreeNoise(std, GaussianNoise(std, seed=4))
    zeros = {"w": torch.zeros(dim)}
    released = torch.zeros(dim)
    for t in range(1, rounds + 1):
        released += tree.residual(zeros)["w"]  # with zero data, the running sum is the prefix noise
        assert torch.allclose(released, tree.prefix_noise()["w"], atol=1e-4)
        assert float(released.var()) == pytest.approx(prefix_node_count(t) * std ** 2, rel=0.02)


def test_residuals_add_up_to_the_data_plus_prefix_noise_and_restart_cleanly():
    """Within each tree, the released residuals sum to the data plus that tree's prefix noise; a
    restart starts a fresh tree (no node is carried over)."""
    tree = TreeNoise(0.5, GaussianNoise(0.5, seed=1), restart_every=4)
    released = data = torch.zeros(3)
    for t in range(1, 10):
        x = torch.full((3,), float(t))
        if (t - 1) % 4 == 0:
            released, data = torch.zeros(3), torch.zeros(3)
        released = released + tree.residual({"w": x})["w"]
        data = data + x
        assert torch.allclose(released, data + tree.prefix_noise()["w"], atol=1e-5)
        assert tree.step == (t - 1) % 4 + 1
        assert len(tree.nodes) == prefix_node_count(tree.step)


def test_tree_state_round_trips_so_a_resumed_run_continues_the_same_prefix_sums():
    a = TreeNoise(1.0, GaussianNoise(1.0, seed=9))
    for _ in range(5):
        a.residual({"w": torch.zeros(4)})
    b = TreeNoise(1.0, GaussianNoise(1.0, seed=9))
    b.noise.load_state_dict(a.noise.state_dict())
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(a.residual({"w": torch.ones(4)})["w"], b.residual({"w": torch.ones(4)})["w"])


@pytest.mark.parametrize("separation,cap", [(1, 2), (3, 0), (4, 3)])
def test_limited_sampler_enforces_exactly_the_limits_the_accountant_is_told(separation, cap):
    users = np.arange(50)
    sampler = LimitedParticipationSampler(seed=3, sampling_rate=0.2, users_per_client=1, virtual_clients=10,
                                          min_separation=separation, max_participations=cap)
    seen: dict[int, list[int]] = {}
    for r in range(1, 41):
        plan = sampler.plan(r, users)
        assert len(plan.sampled_users) <= 10
        for u in plan.sampled_users:
            seen.setdefault(int(u), []).append(r)
    for rounds in seen.values():
        assert all(b - a >= separation for a, b in zip(rounds, rounds[1:]))
        if cap:
            assert len(rounds) <= cap
    # and the limits are binding, not vacuous: some user hits them
    assert max(len(r) for r in seen.values()) == (cap or max(len(r) for r in seen.values()))
    if separation > 1:
        assert any(b - a == separation for r in seen.values() for a, b in zip(r, r[1:]))


def test_limited_sampler_state_survives_a_checkpoint():
    users = np.arange(30)
    a = LimitedParticipationSampler(1, 0.3, 1, 9, min_separation=2, max_participations=3)
    for r in range(1, 6):
        a.plan(r, users)
    b = LimitedParticipationSampler(1, 0.3, 1, 9, min_separation=2, max_participations=3)
    b.load_state_dict(a.state_dict())
    for r in range(6, 12):
        assert np.array_equal(a.plan(r, users).sampled_users, b.plan(r, users).sampled_users)
