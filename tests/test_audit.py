"""The empirical audit must be able to fail: with the noise or the clipping switched off while the
accountant still claims a small ε, its lower bound exceeds the claim; with the real mechanism it stays
at or below it."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedemb.audit.bounds import clopper_pearson, epsilon_lower_bound
from fedemb.audit.canary_runs import run_audit
from fedemb.cli import app
from fedemb.config import load_config

AUDIT = ['model.name="fedemb_lenet_small"', "model.embedding_dim=8", "data.num_users=12", "sampling.rate=1.0",
         "sampling.users_per_client=1", "client.epochs=1", "client.max_examples=8", "client.batch_size=8",
         "privacy.noise_multiplier=3.0", "privacy.clip_norm=1.0", "privacy.delta=1e-5", "run.seed=0",
         "simulation.num_supernodes=2"]
TRIALS = 100


def audit_config(*extra):
    return load_config(None, AUDIT + list(extra))


def test_real_mechanism_stays_within_its_claim():
    result = run_audit(audit_config(), trials=TRIALS)
    assert 1.0 < result.claimed_epsilon < 2.0  # the claim the broken mechanisms below must be caught at
    assert result.bound.epsilon <= result.claimed_epsilon
    assert result.consistent


def test_audit_catches_missing_noise(monkeypatch):
    import fedemb.privacy.noise as noise

    monkeypatch.setattr(noise.GaussianNoise, "add", lambda self, total, std=None: {k: v.clone() for k, v in total.items()})
    result = run_audit(audit_config(), trials=TRIALS)
    assert result.bound.epsilon > result.claimed_epsilon
    assert not result.consistent


def test_audit_catches_missing_clipping(monkeypatch):
    """Clipping off on the node and the server's norm check off: the canary's 100 C goes through."""
    import fedemb.training.client_task as client_task
    import strategies.reply_validation as reply_validation
    from fedemb.privacy.clipping import global_norm

    monkeypatch.setattr(client_task, "clip_to_norm", lambda update, c: (update, global_norm(update)))
    monkeypatch.setattr(reply_validation, "NORM_SLACK", 1e12)
    result = run_audit(audit_config(), trials=TRIALS)
    assert result.bound.epsilon > result.claimed_epsilon


def test_a_weak_mechanism_is_measured_not_just_passed():
    """Little noise (large claimed ε): the audit finds real leakage (a positive bound), still below the claim."""
    result = run_audit(audit_config("privacy.noise_multiplier=0.5"), trials=TRIALS)  # seeded: reproducible
    assert result.bound.epsilon > 0.5
    assert result.bound.epsilon <= result.claimed_epsilon


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


def test_audit_command_reports_and_writes_json(tmp_path):
    out = tmp_path / "audit.json"
    args = ["audit", "--trials", "8", "--out", str(out)]
    for item in AUDIT:
        args += ["--set", item]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "consistent with the claimed" in result.output
    data = json.loads(out.read_text())
    assert len(data["with_canary_scores"]) == 8 and data["consistent"] is True


@pytest.mark.parametrize("bad", [["--trials", "2"], ["--confidence", "1.5"]])
def test_audit_command_refuses_bad_options(bad):
    result = CliRunner().invoke(app, ["audit", *bad])
    assert result.exit_code == 2 and "Traceback" not in result.output
