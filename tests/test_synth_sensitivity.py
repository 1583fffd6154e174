"""The DP mixture's privacy: every released statistic moves by at most the sensitivity its noise is
scaled to when one user is removed, the noise actually has that scale, and the releases spend exactly
the stage's budget."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedemb.config import SynthConfig
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.contribution import (cell_statistics, count_sensitivity, second_moment_sensitivity,
                                       sum_sensitivity, user_weights)
from fedemb.synth.embedded import Embedded, to_sphere
from fedemb.synth.gmm import fit_dp_gmm, release_shares


def random_population(rng, n, users, cells, dim):
    x = to_sphere(rng.standard_normal((n, dim)))
    # skewed users: a few hold many rows, in many cells, which is where an unbounded user would leak
    owner = np.minimum(rng.geometric(0.08, size=n) - 1, users - 1)
    return x, owner, rng.integers(0, cells, size=n)


def released(x, users, cells, num_cells, bound, second):
    w = user_weights(users, cells, num_cells, bound)
    return cell_statistics(x, cells, w, num_cells, second)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.5, 1.0, 3.0]), st.sampled_from(["diag", "full"]))
def test_removing_one_user_moves_each_statistic_by_at_most_its_sensitivity(seed, bound, second):
    rng = np.random.default_rng(seed)
    num_cells, dim = 6, 5
    x, users, cells = random_population(rng, 300, 30, num_cells, dim)
    full = released(x, users, cells, num_cells, bound, second)
    worst = {"counts": 0.0, "sums": 0.0, "second": 0.0}
    for u in np.unique(users):
        keep = users != u
        without = released(x[keep], users[keep], cells[keep], num_cells, bound, second)
        worst["counts"] = max(worst["counts"], np.linalg.norm(full.counts - without.counts))
        worst["sums"] = max(worst["sums"], np.linalg.norm(full.sums - without.sums))
        worst["second"] = max(worst["second"], np.linalg.norm(full.second - without.second))
    slack = 1 + 1e-5
    assert worst["counts"] <= count_sensitivity(bound) * slack
    assert worst["sums"] <= sum_sensitivity(bound, 1.0) * slack
    assert worst["second"] <= second_moment_sensitivity(bound, 1.0) * slack
    # the bound binds: the heaviest user reaches it on the counts (so the test can tell a missing bound)
    assert worst["counts"] >= 0.99 * bound


def test_without_contribution_bounding_a_heavy_user_would_exceed_the_sensitivity():
    """The check above is not vacuous: unit weights let the heaviest user move the counts far more."""
    rng = np.random.default_rng(0)
    x, users, cells = random_population(rng, 300, 30, 6, 5)
    heavy = np.bincount(users).argmax()
    ones = np.ones(len(x))
    keep = users != heavy
    moved = np.linalg.norm(cell_statistics(x, cells, ones, 6).counts - cell_statistics(x[keep], cells[keep], ones[keep], 6).counts)
    assert moved > 3 * count_sensitivity(1.0)


def test_a_user_with_rows_in_many_cells_keeps_more_than_unit_total_weight():
    users = np.zeros(9, dtype=np.int64)
    cells = np.arange(9)
    w = user_weights(users, cells, 9, 1.0)
    assert w.sum() == pytest.approx(3.0)  # L2 bound: sqrt(9) cells of weight 1/3
    assert np.linalg.norm(np.bincount(cells, weights=w)) == pytest.approx(1.0)


@pytest.mark.parametrize("clusters,covariance,init", [(1, "diag", "mean"), (4, "diag", "mean"), (3, "full", "mean"),
                                                      (2, "lowrank", "mean"), (3, "isotropic", "mean"),
                                                      (3, "diag", "random"), (3, "diag", "public")])
def test_the_releases_spend_exactly_the_stage_budget(clusters, covariance, init):
    cfg = SynthConfig(clusters=clusters, covariance=covariance, init=init, iterations=2, rank=2)
    shares = release_shares(cfg)
    assert sum(shares.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    emb = Embedded(to_sphere(rng.standard_normal((600, 6))), rng.integers(0, 3, 600), rng.integers(0, 60, 600))
    delta = 1e-5
    for epsilon in (0.5, 1.0, 4.0):
        ledger = PrivacyLedger(None, delta, "rdp")
        z = stage_noise_multiplier(epsilon, delta, "rdp")
        public = Embedded(to_sphere(rng.standard_normal((60, 6))), np.arange(60) % 3, np.arange(60))
        fit_dp_gmm(emb, 3, cfg, z, LedgerStage(ledger, "synthesis/gmm 1", NoiseSource(0)), rng, public)
        assert len(ledger.entries) == len(shares)
        assert {e.release for e in ledger.entries} == set(shares)
        assert ledger.epsilon <= epsilon * 1.001
        assert ledger.epsilon >= epsilon * 0.99


def test_the_noise_has_the_recorded_scale():
    """With one cluster per class the final cells are the classes, so the released counts minus the true
    bounded counts are the noise alone: its spread must match z x sensitivity of the recorded release."""
    rng = np.random.default_rng(1)
    classes, dim = 400, 4
    labels = np.repeat(np.arange(classes), 5)
    users = rng.integers(0, 700, len(labels))
    emb = Embedded(to_sphere(rng.standard_normal((len(labels), dim))), labels, users)
    ledger = PrivacyLedger(None, 1e-5)
    cfg = SynthConfig(clusters=1, covariance="diag")
    gmm = fit_dp_gmm(emb, classes, cfg, 2.0, LedgerStage(ledger, "synthesis/gmm 1", NoiseSource(2)),
                     np.random.default_rng(2))
    entry, = [e for e in ledger.entries if e.release == "final counts"]
    recorded_std = entry.noise_multiplier * entry.sensitivity
    true = cell_statistics(emb.x, labels, user_weights(users, labels, classes, 1.0), classes).counts
    noise = gmm.counts[:, 0] - true
    assert np.std(noise) == pytest.approx(recorded_std, rel=0.12)
    assert abs(np.mean(noise)) < 4 * recorded_std / math.sqrt(classes)
