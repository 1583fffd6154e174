"""The empirical audit must be able to fail, and must say when it cannot tell.

With the noise or the clipping switched off while the accountant still claims its ε, the lower bound
exceeds the claim, on the default config too, with as many trials as that claim needs; with the real
mechanism it stays at or below it. When even a perfect separation on the trials could not exceed the
claim, the audit says "inconclusive" (exit 3) and how many trials would decide, instead of "consistent".
"""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from fedemb.audit.bounds import (cheapest_trials, clopper_pearson, epsilon_from_rates, epsilon_lower_bound,
                                 pick_size, reachable_epsilon, trials_to_decide)
from fedemb.cli import app
from fedemb.config import load_config
from simulations.canary_runs import run_audit

AUDIT = ['model.name="fedemb_lenet_small"', "model.embedding_dim=8", "data.num_users=12", "sampling.rate=1.0",
         "sampling.users_per_client=1", "client.epochs=1", "client.max_examples=8", "client.batch_size=8",
         "privacy.noise_multiplier=3.0", "privacy.clip_norm=1.0", "privacy.delta=1e-5", "run.seed=0",
         "simulation.num_supernodes=2"]
DEFAULT_CLAIM = 3.3408  # `fedemb privacy --set run.rounds=1`: q = 0.1, z = 1, k = 8 (sensitivity 2C), δ = 80^-1.1


def audit_config(*extra):
    return load_config(None, AUDIT + list(extra))


def invoke_audit(tmp_path, *args):
    out = tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["audit", "--out", str(out), *args], terminal_width=200)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def switch_noise_off(monkeypatch):
    import fedemb.privacy.noise as noise

    def unchanged(self, total, std=None):
        return {k: v.clone() for k, v in total.items()}

    monkeypatch.setattr(noise.GaussianNoise, "add", unchanged)


def switch_clipping_off(monkeypatch):
    """Clipping off on the node and the server's norm check off: the canary's 100 C goes through."""
    import fedemb.training.client_task as client_task
    import strategies.reply_validation as reply_validation
    from fedemb.privacy.clipping import global_norm

    monkeypatch.setattr(client_task, "clip_to_norm", lambda update, c: (update, global_norm(update)))
    monkeypatch.setattr(reply_validation, "NORM_SLACK", 1e12)


# ------------------------------------------------------------------ the mechanism, end to end

@pytest.mark.slow
def test_the_real_mechanism_stays_within_its_claim():
    result = run_audit(audit_config(), trials=40)  # the other virtual clients train, as in a run
    assert 1.0 < result.claimed_epsilon < 2.0
    assert result.plan.decidable  # 40 trials per world could have shown more than the claim
    assert result.bound.epsilon <= result.claimed_epsilon
    assert result.verdict == "consistent" and result.consistent


@pytest.mark.slow
def test_a_weak_mechanism_is_measured_not_just_passed():
    """Little noise (large claimed ε): the audit finds real leakage (a positive bound), still below the claim."""
    result = run_audit(audit_config("privacy.noise_multiplier=0.5"), trials=100, others="silent", measure=True)
    assert result.verdict == "inconclusive"  # 100 trials per world cannot show the claimed ε ≈ 10.7
    assert result.bound.epsilon > 0.5  # seeded: reproducible
    assert result.bound.epsilon <= result.claimed_epsilon


def test_the_default_config_is_inconclusive_at_200_trials_and_says_how_many_would_decide(tmp_path):
    result, report = invoke_audit(tmp_path)  # no --config: the default config, one round, 200 trials
    assert result.exit_code == 3, result.output
    assert "inconclusive" in result.output and "--trials 1374" in result.output
    assert report["verdict"] == "inconclusive" and report["consistent"] is False
    assert report["claimed_epsilon"] == pytest.approx(DEFAULT_CLAIM, abs=1e-3)
    assert report["canary_inclusion_probability"] == pytest.approx(0.1)
    # the canary takes part in a tenth of the runs: even a perfect separation shows only about 1.6
    assert report["reachable_epsilon"] == pytest.approx(1.5756, abs=1e-3)
    assert report["trials_per_world_to_decide"] == 1374 and report["cheapest_trials_to_decide"] == [78, 1459]
    assert report["epsilon_lower_bound"] is None and report["with_canary_scores"] == []  # no run was wasted


@pytest.mark.parametrize("break_it", [switch_noise_off, switch_clipping_off], ids=["no-noise", "no-clipping"])
@pytest.mark.slow
def test_a_broken_default_config_is_caught_with_the_trials_its_claim_needs(tmp_path, monkeypatch, break_it):
    """The default config's real mechanism with the noise or the clipping off, the accountant still
    claiming ε = 3.34 for one round: --trials auto sizes the runs (78 with the canary, each drawn
    among the runs in which it is sampled; 1459 without) and the bound exceeds the claim."""
    break_it(monkeypatch)
    result, report = invoke_audit(tmp_path, "--trials", "auto", "--others", "silent")
    assert result.exit_code == 1, result.output
    assert "violation" in result.output and "EXCEEDS" in result.output
    assert [report["trials_with_canary"], report["trials_without_canary"]] == report["cheapest_trials_to_decide"]
    assert report["epsilon_lower_bound"] > report["claimed_epsilon"] == pytest.approx(DEFAULT_CLAIM, abs=1e-3)
    with_scores, without_scores = np.array(report["with_canary_scores"]), np.array(report["without_canary_scores"])
    assert with_scores.min() > without_scores.max()  # every run with the canary had it sampled
    assert 0.05 < report["canary_inclusion_observed"] < 0.2  # rejection sampling saw the sampler's q = 0.1


def test_audit_command_reports_a_consistent_mechanism_and_writes_json(tmp_path):
    args = ["--trials", "40", "--others", "silent"] + [a for item in AUDIT for a in ("--set", item)]
    result, report = invoke_audit(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert "consistent with the claimed" in result.output
    assert report["verdict"] == "consistent" and report["consistent"] is True
    assert report["reachable_epsilon"] > report["claimed_epsilon"]
    assert len(report["with_canary_scores"]) == 40 and report["others"] == "silent"


@pytest.mark.parametrize("bad", [["--trials", "2"], ["--trials", "some"], ["--confidence", "1.5"],
                                 ["--others", "loud"]])
def test_audit_command_refuses_bad_options(bad):
    result = CliRunner().invoke(app, ["audit", *bad])
    assert result.exit_code == 2 and "Traceback" not in result.output


# ------------------------------------------------------------------ the statistics

def test_clopper_pearson_bounds_cover_the_truth_at_their_confidence():
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(2000):
        k = rng.binomial(50, 0.3)
        lo, hi = clopper_pearson(int(k), 50, 0.05)
        misses += lo > 0.3
    assert misses / 2000 <= 0.05


def test_identical_score_distributions_give_no_leakage():
    rng = np.random.default_rng(1)
    bound = epsilon_lower_bound(rng.normal(size=400), rng.normal(size=400), delta=1e-5)
    assert bound.epsilon < 0.5


def test_the_reachable_bound_has_its_closed_form():
    """200 trials per world, 160 of them evaluating: TPR ≥ 0.025^(1/160) = 0.977208, FPR ≤ 0.022792."""
    assert reachable_epsilon(200, 200, 1e-5) == pytest.approx(math.log((0.977208 - 1e-5) / 0.022792), abs=1e-4)
    assert reachable_epsilon(200, 200, 1e-5) == pytest.approx(3.758, abs=1e-3)
    # the canary in a tenth of the runs: (0.1·TPR − δ)/FPR + 0.9
    assert reachable_epsilon(200, 200, 0.008065, inclusion=0.1) == pytest.approx(
        math.log((0.0977208 - 0.008065) / 0.022792 + 0.9), abs=1e-4)


@pytest.mark.parametrize("inclusion", [1.0, 0.3])
def test_the_reachable_bound_is_the_largest_any_outcome_of_the_trials_gives(inclusion):
    n_w, n_o, delta, alpha = 12, 17, 1e-3, 0.05
    e_w, e_o = n_w - pick_size(n_w), n_o - pick_size(n_o)
    every_outcome = [epsilon_from_rates(clopper_pearson(tp, e_w, alpha / 2)[0], clopper_pearson(fp, e_o, alpha / 2)[1],
                                        delta, inclusion) for tp in range(e_w + 1) for fp in range(e_o + 1)]
    reachable = reachable_epsilon(n_w, n_o, delta, 1 - alpha, inclusion)
    assert reachable == pytest.approx(max(every_outcome)) and reachable > 0
    separated = epsilon_lower_bound(np.full(n_w, 5.0), np.zeros(n_o), delta, 1 - alpha, inclusion)
    assert separated.epsilon == pytest.approx(reachable)


def test_trials_to_decide_are_the_fewest_whose_reachable_bound_exceeds_the_claim():
    for claim, delta, inclusion in [(1.0, 1e-5, 1.0), (2.0, 1e-3, 0.5), (DEFAULT_CLAIM, 0.008065, 0.1)]:
        n = trials_to_decide(claim, delta, inclusion=inclusion)
        assert reachable_epsilon(n, n, delta, inclusion=inclusion) > claim
        assert reachable_epsilon(n - 1, n - 1, delta, inclusion=inclusion) <= claim
    # unequal worlds: brute force over every pair up to 40 runs each
    claim = 1.2
    fewest = min(w + o for w in range(2, 41) for o in range(2, 41) if reachable_epsilon(w, o, 1e-5) > claim)
    assert sum(cheapest_trials(claim, 1e-5, cap=40)) == fewest
    assert cheapest_trials(30.0, 1e-5, cap=10_000) is None  # e^30 is beyond any sane trial count


def test_weighting_tpr_by_the_inclusion_probability_keeps_the_bound_valid():
    """Runs with the canary drawn among those in which it is sampled (q = 0.1) show every time; without
    it a run scores high with probability f. The true ε is ln((q·1 − δ)/f + 1 − q): the bound stays
    below it at its confidence, while the same runs taken as unconditioned would claim far more."""
    q, f, delta, n = 0.1, 0.02, 1e-3, 600
    true_epsilon = math.log((q - delta) / f + 1 - q)
    rng = np.random.default_rng(3)
    weighted, unweighted = [], []
    for _ in range(300):
        with_scores, without_scores = np.ones(n), (rng.random(n) < f).astype(float)
        weighted.append(epsilon_lower_bound(with_scores, without_scores, delta, inclusion=q).epsilon)
        unweighted.append(epsilon_lower_bound(with_scores, without_scores, delta).epsilon)
    assert np.mean(np.array(weighted) > true_epsilon) <= 0.05
    assert np.median(weighted) > 0.7 * true_epsilon  # and it is not vacuous
    assert np.mean(np.array(unweighted) > true_epsilon) > 0.95
