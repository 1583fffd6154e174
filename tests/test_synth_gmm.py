"""`fedemb synth gmm`: the mixture fits what it should, its samples train a classifier that works on
real data, the CLI writes every output and adds every release (mixture, baselines, sweep points) to the
run's ledger, publishes only those releases and non-private figures only under private/, and bad input
is a one-line error."""

import json

import numpy as np
import pytest

from fedemb.config import SynthConfig
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.classifier import accuracy, train_mlp
from fedemb.synth.embedded import Embedded, to_sphere
from fedemb.synth.gmm import fit_dp_gmm, release_shares
from tests.helpers import cli, sets
from tests.test_synth_release import (assert_published_accuracies_are_releases_or_private,
                                      independently_composed_epsilon)

FAST = ["synth.seed=0", "synth.mlp_epochs=5", "synth.probe_epochs=3", "synth.samples_per_class=300"]


def clustered(rng, classes=4, modes=2, users=400, per_user=5, dim=8, spread=0.15):
    """Each class is a mixture of `modes` blobs on the sphere; every user holds rows of several classes."""
    centres = to_sphere(rng.standard_normal((classes, modes, dim)).reshape(-1, dim)).reshape(classes, modes, dim)
    n = users * per_user
    labels = rng.integers(0, classes, n)
    modes_of = rng.integers(0, modes, n)
    x = to_sphere(centres[labels, modes_of] + spread * rng.standard_normal((n, dim)))
    return Embedded(x, labels, np.repeat(np.arange(users), per_user)), centres


def test_without_noise_the_mixture_recovers_the_class_modes_and_its_samples_classify_real_data():
    rng = np.random.default_rng(0)
    private, centres = clustered(rng)
    private, test = split_users(private, 300)
    cfg = SynthConfig(clusters=2, iterations=5, covariance="full")
    gmm = fit_dp_gmm(private, 4, cfg, 0.0, memory_stage(), np.random.default_rng(2))
    assert gmm.weights.shape == (4, 2) and np.allclose(gmm.weights.sum(1), 1)
    for c in range(4):  # every true mode has a fitted mean close to it (up to the sphere's curvature)
        dist = np.linalg.norm(gmm.means[c][:, None, :] - centres[c][None, :, :], axis=2)
        assert dist.min(axis=0).max() < 0.1
    cov = np.einsum("ckdr,ckr,cker->ckde", gmm.eigvecs, gmm.eig_std**2, gmm.eigvecs)
    assert (np.linalg.eigvalsh(cov) >= cfg.eigenvalue_floor * 0.999).all()
    x, y = gmm.sample(500, np.random.default_rng(3))
    assert x.shape == (2000, 8) and np.bincount(y).tolist() == [500] * 4
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # the classes overlap a little: the bar is a classifier trained on the real private rows
    real = accuracy(train_mlp(private.x, private.labels, 4, hidden=64, epochs=10), test.x, test.labels)
    assert accuracy(train_mlp(x, y, 4, hidden=64, epochs=10), test.x, test.labels) >= real - 0.02


@pytest.mark.parametrize("covariance", ["isotropic", "diag", "lowrank"])
def test_under_dp_the_samples_still_train_a_good_classifier(covariance):
    rng = np.random.default_rng(4)
    private, test = split_users(clustered(rng, users=3500, per_user=2)[0], 3000)
    real = accuracy(train_mlp(private.x, private.labels, 4, hidden=64, epochs=10), test.x, test.labels)
    cfg = SynthConfig(clusters=2, covariance=covariance, rank=2)
    gmm = fit_dp_gmm(private, 4, cfg, 3.0, memory_stage(), np.random.default_rng(6))
    x, y = gmm.sample(500, np.random.default_rng(7))
    synthetic = accuracy(train_mlp(x, y, 4, hidden=64, epochs=10), test.x, test.labels)
    assert synthetic >= real - 0.05, (synthetic, real)


def memory_stage():
    return LedgerStage(PrivacyLedger(None, 1e-5), "synthesis/gmm 1", NoiseSource(0))


def split_users(emb, first):
    """Users below `first` stay private; the rest are held out as the test set."""
    keep = emb.users < first
    return (Embedded(emb.x[keep], emb.labels[keep], emb.users[keep]),
            Embedded(emb.x[~keep], emb.labels[~keep], emb.users[~keep]))


def _write(path, emb):
    np.savez(path, embeddings=emb.x, labels=emb.labels, users=emb.users)
    return str(path)


@pytest.mark.slow
def test_cli_writes_every_output_and_records_every_sweep_point_and_baseline_as_a_release(tmp_path):
    private, test = split_users(clustered(np.random.default_rng(8), users=700, per_user=3)[0], 600)
    out = tmp_path / "out"
    code, output = cli("synth", "gmm", "--embeddings", _write(tmp_path / "p.npz", private), "--test-embeddings",
                       _write(tmp_path / "t.npz", test), *sets(FAST + ["synth.epsilon=2"]), "--epsilons", "1,4",
                       "--out", out, "--json")
    assert code == 0, output
    results = json.loads(output.strip().splitlines()[-1])
    for name in ("gmm.npz", "synthetic.npz", "classifier.pt", "synth_results.json", "accuracy_vs_epsilon.png",
                 "privacy.json", "private/synth_private.json"):
        assert (out / name).is_file(), name
    assert (out / "tensorboard" / "synthesis-gmm" / "projector_config.pbtxt").is_file()
    assert [p["epsilon"] for p in results["sweep"]] == [1.0, 2.0, 4.0]
    ledger = PrivacyLedger.load(out / "privacy.json")
    by_stage = {}
    for e in ledger.entries:
        by_stage.setdefault(e.stage, []).append(e)
    assert set(by_stage) == {f"synthesis/gmm 1{point}{side}" for point in ("", " sweep ε=1.0", " sweep ε=4.0")
                             for side in ("", " baselines")}
    for point in results["sweep"]:
        for method in ("gmm_mlp", "dpsgd_linear_probe", "dp_prototypes"):
            assert 0 <= point[method]["accuracy"] <= 1
            assert point[method]["spent_epsilon"] == pytest.approx(point["epsilon"], rel=0.01)
            assert point[method]["spent_epsilon"] <= point["epsilon"] * 1.001
        assert ledger.epsilon_of(by_stage[point["gmm_mlp"]["stage"]]) == pytest.approx(point["epsilon"], rel=0.01)
    assert results["released"]["epsilon"] == pytest.approx(2.0, rel=0.01)
    assert ledger.epsilon == pytest.approx(independently_composed_epsilon(ledger))
    assert ledger.epsilon > 4 * 1.5  # nine releases of up to ε = 4 each: far more than any one of them
    assert_published_accuracies_are_releases_or_private(out, "synth_results.json", output, ledger)
    with np.load(out / "synthetic.npz") as f:
        assert f["embeddings"].shape == (4 * 300, 8)
    assert results["released"]["gmm_mlp_accuracy"] > 0.5


@pytest.mark.slow
def test_synthesis_on_a_run_publishes_only_ledger_releases_and_composes_them_with_the_training(trained_run):
    """A default `synth gmm` (mixture and both baselines) on a run: every accuracy it publishes is backed
    by a ledger stage, the non-private MLP is only in private/, and the ledger counts every release."""
    run = trained_run
    trained_epsilon = PrivacyLedger.load(run / "privacy.json").epsilon
    out = run / "synth" / "gmm"
    code, output = cli("synth", "gmm", run, *sets(FAST + ["synth.clusters=1", "synth.epsilon=1"]), "--out", out)
    assert code == 0, output
    results = json.loads((out / "synth_results.json").read_text())
    ledger = PrivacyLedger.load(run / "privacy.json")
    releases = {}
    for e in ledger.entries:
        releases.setdefault(e.stage, []).append(e.release)
    assert len(releases.pop("training")) == 2
    assert releases == {"synthesis/gmm 1": ["class counts", "prototype sums"],  # adaptive, at most 1 cluster
                        "synthesis/gmm 1 baselines": ["prototype sums", "dp-sgd linear probe"]}
    assert results["ledger_epsilon_before"] == pytest.approx(trained_epsilon)
    assert results["ledger_epsilon_total"] == pytest.approx(ledger.epsilon)
    assert ledger.epsilon == pytest.approx(independently_composed_epsilon(ledger))
    assert results["released"]["epsilon"] == pytest.approx(1.0, rel=0.01)
    assert results["baselines"]["epsilon"] > results["released"]["epsilon"]  # two releases at ε = 1
    assert_published_accuracies_are_releases_or_private(out, "synth_results.json", output, ledger)
    nonprivate = json.loads((out / "private" / "synth_private.json").read_text())
    assert 0 <= nonprivate["nonprivate_mlp_accuracy"] <= 1
    # a second synthesis is a new release and counts again
    code, output = cli("synth", "gmm", run, *sets(FAST + ["synth.clusters=1", "synth.epsilon=1"]),
                       "--no-baselines", "--json")
    assert code == 0, output
    again = PrivacyLedger.load(run / "privacy.json")
    assert again.epsilon > ledger.epsilon
    assert {e.stage for e in again.entries[len(ledger.entries):]} == {"synthesis/gmm 2"}


@pytest.mark.parametrize("case,needle", [
    ("wrong_dim", "dimension 5, expected 8"),
    ("few_users", "fewer than synth.clusters"),
    ("zero_epsilon", "synth.epsilon must be > 0"),
    ("bad_sweep", "--epsilons must all be finite and > 0"),
    ("not_npz", "not a readable .npz"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, needle):
    rng = np.random.default_rng(10)
    private, test = split_users(clustered(rng, users=70, per_user=4)[0], 50)
    test_path = _write(tmp_path / "t.npz", test)
    extra = []
    if case == "wrong_dim":
        test_path = _write(tmp_path / "t5.npz", Embedded(to_sphere(rng.standard_normal((30, 5))), np.zeros(30, int),
                                                          np.arange(30)))
    if case == "few_users":
        private.users = private.users % 3  # 3 users per class, 4 clusters
        extra = ["synth.clusters=4"]
    if case == "zero_epsilon":
        extra = ["synth.epsilon=0"]
    private_path = _write(tmp_path / "p.npz", private)
    if case == "not_npz":
        (tmp_path / "p.npz").write_text("not an archive")
    out = tmp_path / "out"
    args = ["synth", "gmm", "--embeddings", private_path, "--test-embeddings", test_path, *sets(FAST + extra),
            "--out", out]
    if case == "bad_sweep":
        args += ["--epsilons", "1,0"]
    code, output = cli(*args)
    assert code == 2, output
    assert needle in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists()
