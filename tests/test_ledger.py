"""The privacy ledger: one entry per release, on disk before the release is used, composed exactly as
Opacus composes the mechanisms; and `fedemb privacy report`."""

import json
import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm
from typer.testing import CliRunner

from fedemb.cli import app
from fedemb.privacy.ledger import PrivacyLedger, LedgerEntry


def gaussian_entry(r, z=1.0, q=0.1, attempt=0):
    return LedgerEntry("training", f"round {r}", "sampled_gaussian", {"kind": "sampled_gaussian", "z": z, "q": q,
                       "steps": 1}, round=r, sampling_rate=q, noise_multiplier=z, sensitivity=1.0, attempt=attempt)


def tree_entry(r, z, key="training/attempt-0"):
    return LedgerEntry("training", f"round {r}", "tree_aggregation", {"kind": "tree", "key": key, "z": z}, round=r)


def test_cumulative_epsilon_composes_every_release_like_opacus(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    for r in range(1, 11):
        ledger.record(gaussian_entry(r, z=1.2 if r <= 5 else 0.9))
    acc = RDPAccountant()
    acc.history = [(1.2, 0.1, 5), (0.9, 0.1, 5)]
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert [e.epsilon for e in ledger.entries] == sorted(e.epsilon for e in ledger.entries)  # never decreases


def test_each_entry_is_on_disk_when_record_returns(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(path, delta=1e-5)
    for r in (1, 2, 3):
        ledger.record(gaussian_entry(r))
        on_disk = json.loads(path.read_text())
        assert on_disk["releases"] == r and on_disk["entries"][-1]["release"] == f"round {r}"
        assert float(on_disk["epsilon"]) == pytest.approx(ledger.epsilon)
    again = PrivacyLedger.load(path)
    assert [e.key for e in again.entries] == [e.key for e in ledger.entries]
    assert again.epsilon == pytest.approx(ledger.epsilon)


def test_a_replayed_release_is_not_counted_twice_but_a_new_attempt_is(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    ledger.record(gaussian_entry(1))
    eps = ledger.epsilon
    ledger.record(gaussian_entry(1))  # a seeded resume replays round 1 bit for bit
    assert len(ledger.entries) == 1 and ledger.epsilon == eps
    ledger.record(gaussian_entry(1, attempt=1))  # OS noise: the re-run round is a new release
    assert len(ledger.entries) == 2 and ledger.epsilon > eps
    with pytest.raises(RuntimeError, match="other accounting"):
        ledger.record(gaussian_entry(1, z=5.0))


def test_a_tree_counts_once_at_its_latest_extent_and_attempts_add_up(tmp_path):
    ledger = PrivacyLedger(None, delta=1e-5)
    ledger.record(tree_entry(1, z=4.0))
    ledger.record(tree_entry(2, z=3.0))  # the same tree, now released further
    acc = RDPAccountant()
    acc.history = [(3.0, 1.0, 1)]
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5))
    ledger.record(tree_entry(3, z=3.0, key="training/attempt-1"))
    acc.history = [(3.0, 1.0, 2)]
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5))


def test_a_release_without_noise_makes_epsilon_infinite():
    ledger = PrivacyLedger(None, delta=1e-5)
    ledger.record(gaussian_entry(1))
    ledger.record(LedgerEntry("training", "round 2", "none", {"kind": "none"}, round=2))
    assert math.isinf(ledger.epsilon)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018): the exact ε of one Gaussian mechanism with sensitivity 1 and std sigma."""
    def delta_of(eps):
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma", [0.8, 1.5, 3.0])
def test_one_round_without_sampling_is_the_analytic_gaussian_mechanism(sigma):
    """q = 1, one release: PRV gives the exact ε (to its error bound); RDP is an upper bound."""
    delta = 1e-5
    exact = analytic_gaussian_epsilon(sigma, delta)
    prv = PrivacyLedger(None, delta, accountant="prv")
    prv.record(gaussian_entry(1, z=sigma, q=1.0))
    assert prv.epsilon == pytest.approx(exact, abs=0.02)
    rdp = PrivacyLedger(None, delta, accountant="rdp")
    rdp.record(gaussian_entry(1, z=sigma, q=1.0))
    assert exact <= rdp.epsilon <= exact * 1.6
    acc = PRVAccountant()
    acc.history = [(sigma, 1.0, 1)]
    assert prv.epsilon == pytest.approx(acc.get_epsilon(delta=delta, eps_error=0.01))


def test_privacy_report_prints_the_table_and_one_line(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    for r in range(1, 5):
        ledger.record(gaussian_entry(r))
    result = CliRunner().invoke(app, ["privacy", "report", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "round 1 – 4" in result.output
    assert f"(ε, δ) = ({ledger.epsilon:.4g}, 1e-05) for the whole run: 4 releases" in result.output
    as_json = CliRunner().invoke(app, ["privacy", "report", str(tmp_path), "--json"])
    assert json.loads(as_json.output)["releases"] == 4


def test_privacy_report_on_a_directory_without_a_ledger_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["privacy", "report", str(tmp_path)])
    assert result.exit_code == 2 and "no privacy ledger" in result.output and "Traceback" not in result.output
