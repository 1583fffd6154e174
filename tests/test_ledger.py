"""The privacy ledger: one entry per release, on disk before the release is used, composed exactly as
Opacus composes the mechanisms; and `fedemb privacy report`."""

import json
import math
import re

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm
from typer.testing import CliRunner

from fedemb.cli import app
from fedemb.errors import ConcurrentReleaseError
from fedemb.privacy.ledger import ADD_REMOVE, ZERO_OUT, LedgerEntry, PrivacyLedger, release_digest


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


def test_a_ledger_of_noisy_releases_composes_past_opacus_default_orders_without_a_warning(tmp_path):
    """Releases with much noise at a small rate: the best RDP order is past Opacus's defaults, so the
    ledger's ε is the plan's (extended orders), below Opacus's default-order figure, and nothing warns."""
    import warnings

    from fedemb.privacy.accountant import epsilon_for

    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for r in range(1, 11):
            ledger.record(gaussian_entry(r, z=5.0, q=0.01))
        planned = epsilon_for("rdp", 0.01, 5.0, 10, 1e-5)
    acc = RDPAccountant()
    acc.history = [(5.0, 0.01, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "Optimal order is the largest alpha"
        default_orders = acc.get_epsilon(1e-5)
    assert ledger.epsilon == planned < 0.5 * default_orders


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


def synthesis_entry(stage, z=2.0):
    return LedgerEntry(stage, "prototype sums", "gaussian", {"kind": "sampled_gaussian", "z": z, "q": 1.0, "steps": 1},
                       sampling_rate=1.0, noise_multiplier=z, sensitivity=1.0)


def test_two_processes_releasing_into_one_ledger_keep_both_releases(tmp_path):
    """Two `fedemb synth` commands on one run each hold the ledger in memory: what one records is read
    back by the other before it writes, so the file counts both; a key the other already took is refused
    before anything is released (its noise would be drawn twice for one entry)."""
    path = tmp_path / "privacy.json"
    first = PrivacyLedger(path, delta=1e-5)
    first.record(gaussian_entry(1))
    second = PrivacyLedger.load(path)
    late = PrivacyLedger.load(path)  # loaded before the two synthesis releases, records after them
    first.record(synthesis_entry("synthesis/invert 1"))
    second.record(synthesis_entry("synthesis/gmm 1"))
    on_disk = PrivacyLedger.load(path)
    assert {e.stage for e in on_disk.entries} == {"training", "synthesis/invert 1", "synthesis/gmm 1"}
    both = PrivacyLedger(None, 1e-5)
    for e in (gaussian_entry(1), synthesis_entry("a"), synthesis_entry("b")):
        both.record(e)
    assert on_disk.epsilon == pytest.approx(both.epsilon) and second.epsilon == pytest.approx(both.epsilon)
    with pytest.raises(ConcurrentReleaseError, match="another process recorded"):
        late.record(synthesis_entry("synthesis/gmm 1"))
    assert len(PrivacyLedger.load(path).entries) == 3


def test_confirming_a_release_keeps_what_another_process_recorded_meanwhile(tmp_path):
    path = tmp_path / "privacy.json"
    training = PrivacyLedger(path, delta=1e-5)
    round_one = training.record(gaussian_entry(1))
    PrivacyLedger.load(path).record(synthesis_entry("synthesis/invert 1"))  # a synthesis on the same run
    assert training.confirm_release(round_one, "ab" * 32)
    on_disk = PrivacyLedger.load(path)
    assert {e.stage for e in on_disk.entries} == {"training", "synthesis/invert 1"}
    assert on_disk.entries[0].release_sha256 == "ab" * 32


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


def test_every_entry_states_its_neighbouring_relation_and_old_ledgers_load_with_their_default(tmp_path):
    """Ledgers written before entries stated a relation: sampled-Gaussian and noiseless releases are
    add/remove, a tree is zero-out."""
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    ledger.record(gaussian_entry(1))
    ledger.record(LedgerEntry("training", "round 2", "none", {"kind": "none"}, round=2))
    ledger.record(tree_entry(3, z=3.0))
    assert [e.neighbouring for e in ledger.entries] == [ADD_REMOVE, ADD_REMOVE, ZERO_OUT]
    old = json.loads((tmp_path / "privacy.json").read_text())
    for key in ("neighbouring", "epsilon_by_relation"):
        old.pop(key)
    for e in old["entries"]:
        e.pop("neighbouring"), e.pop("release_sha256")
    (tmp_path / "privacy.json").write_text(json.dumps(old))
    again = PrivacyLedger.load(tmp_path / "privacy.json")
    assert [e.neighbouring for e in again.entries] == [ADD_REMOVE, ADD_REMOVE, ZERO_OUT]
    with pytest.raises(ValueError, match="neighbouring relation"):
        LedgerEntry("training", "round 1", "x", {"kind": "none"}, neighbouring="swap-two")


def test_releases_under_different_neighbouring_relations_get_an_epsilon_each_and_no_single_one(tmp_path):
    """A DP-FTRL run (zero-out) followed by an add/remove release: their guarantees are about different
    pairs of data sets, so the ledger composes each relation on its own and never claims one ε."""
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=1e-5)
    ledger.record(tree_entry(1, z=4.0))
    ledger.record(tree_entry(2, z=3.0))
    zero_out = ledger.epsilon
    assert math.isfinite(zero_out)
    synthesis = LedgerEntry("synthesis 1", "means", "Gaussian noise on the means", {"kind": "sampled_gaussian",
                            "z": 2.0, "q": 1.0, "steps": 1})
    ledger.record(synthesis)
    add_remove = PrivacyLedger(None, delta=1e-5)
    add_remove.record(LedgerEntry(**{**synthesis.to_json(), "epsilon": math.nan}))
    assert ledger.epsilon_by_relation() == {ADD_REMOVE: pytest.approx(add_remove.epsilon), ZERO_OUT: zero_out}
    assert synthesis.epsilon == pytest.approx(add_remove.epsilon)  # cumulative within its own relation
    assert math.isinf(ledger.epsilon) and math.isinf(ledger.epsilon_with(tree_entry(3, z=3.0)))  # no mixed claim
    on_disk = json.loads((tmp_path / "privacy.json").read_text())
    assert on_disk["neighbouring"] == [ADD_REMOVE, ZERO_OUT] and on_disk["epsilon"] == "inf"
    result = CliRunner().invoke(app, ["privacy", "report", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"({zero_out:.4g}, 1e-05) under zero-out neighbours: 2 releases (training)" in out
    assert f"({add_remove.epsilon:.4g}, 1e-05) under add/remove neighbours: 1 releases (synthesis 1)" in out
    assert "no single (ε, δ) for the whole run" in out and not re.search(r"= \([^)]*\) for the whole run", out)


def test_a_release_digest_confirms_a_replay_only_when_every_bit_is_the_same():
    import torch

    release = {"w": torch.linspace(-1, 1, 50), "b": torch.zeros(3)}
    digest = release_digest(release, {"clip-norm": 1.0})
    flipped = {"w": release["w"].clone(), "b": release["b"]}
    flipped["w"].view(torch.int32)[7] ^= 1  # the last bit of one coordinate
    assert release_digest(flipped, {"clip-norm": 1.0}) != digest
    assert release_digest(release, {"clip-norm": 1.0 + 1e-12}) != digest  # released scalars count too
    assert release_digest({k: v.clone() for k, v in release.items()}, {"clip-norm": 1.0}) == digest
    ledger = PrivacyLedger(None, delta=1e-5)
    entry = ledger.record(gaussian_entry(1))
    assert ledger.confirm_release(entry, digest) and entry.release_sha256 == digest
    assert ledger.confirm_release(ledger.record(gaussian_entry(1)), digest)  # the replay: same bits, free
    assert not ledger.confirm_release(ledger.record(gaussian_entry(1)), release_digest(flipped))
    assert entry.release_sha256 == digest  # the recorded digest is never overwritten
