"""The adaptive DP mixture: its detail is chosen from released class counts and the budget only; at a
small budget it is the prototype form (the release of DP prototypes, and a classifier on its samples
that agrees with nearest-prototype classification), at a large one it adds clusters; every release
moves by at most its recorded sensitivity when a user is removed, and the stage spends exactly its ε."""

import numpy as np
import pytest

from fedemb.config import SynthConfig
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.adaptive_gmm import choose_clusters, fit_adaptive_gmm
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.classifier import train_mlp
from fedemb.synth.contribution import cell_statistics, user_weights
from fedemb.synth.embedded import Embedded, to_sphere


def clustered(rng, users=300, per_user=12, classes=4, dim=6, heavy=True):
    """Each class two well-separated modes; one heavy user with many rows in one class."""
    centres = to_sphere(rng.standard_normal((classes, 2, dim))) * 0.9
    n = users * per_user
    labels = rng.integers(0, classes, n)
    modes = rng.integers(0, 2, n)
    x = to_sphere(centres[labels, modes] + 0.15 * rng.standard_normal((n, dim)))
    owners = np.repeat(np.arange(users), per_user)
    if heavy:
        x = np.concatenate([x, np.repeat(x[:1], 200, 0)])
        labels = np.concatenate([labels, np.full(200, labels[0])])
        owners = np.concatenate([owners, np.full(200, users)])
    return Embedded(x.astype(np.float32), labels.astype(np.int64), owners.astype(np.int64))


def fit(emb, epsilon, seed=0, **settings):
    ledger = PrivacyLedger(None, 1e-5)
    stage = LedgerStage(ledger, "synthesis/gmm 1", NoiseSource(seed))
    s = SynthConfig(**{"clusters": 4, **settings})
    gmm = fit_adaptive_gmm(emb, 4, s, stage_noise_multiplier(epsilon, 1e-5, "rdp"), stage,
                           np.random.default_rng(seed))
    return gmm, ledger


@pytest.mark.parametrize("epsilon", [0.2, 1000.0])
def test_the_stage_spends_exactly_its_epsilon_whatever_form_it_chooses(epsilon):
    gmm, ledger = fit(clustered(np.random.default_rng(0)), epsilon)
    assert ledger.epsilon == pytest.approx(epsilon, rel=0.01, abs=0.006) and ledger.epsilon <= epsilon * 1.001
    assert ledger.entries[0].release == "class counts"  # the detail is chosen after this release only


def test_a_small_budget_gives_the_prototype_form_and_a_large_one_clusters():
    emb = clustered(np.random.default_rng(1))
    small, small_ledger = fit(emb, 0.2)
    large, large_ledger = fit(emb, 1000.0)
    assert [e.release for e in small_ledger.entries] == ["class counts", "prototype sums"]
    assert small.history[0]["form"] == "prototypes" and small.means.shape[1] == 1
    assert large.history[0]["form"] == "detailed" and large.history[0]["clusters"] > 1
    assert "final sums" in [e.release for e in large_ledger.entries]


def test_the_choice_reads_only_the_noisy_counts_and_grows_with_the_budget():
    s = SynthConfig(clusters=8)
    counts = np.full(10, 500.0)
    chosen = [choose_clusters(counts, z, s, 32) for z in (20.0, 5.0, 1.0, 0.1)]
    assert chosen == sorted(chosen) and chosen[0] == 1 and chosen[-1] == 8
    assert choose_clusters(counts / 10, 1.0, s, 32) < choose_clusters(counts, 1.0, s, 32)  # fewer rows, less detail


def test_the_prototype_forms_samples_train_a_classifier_that_agrees_with_its_prototypes():
    rng = np.random.default_rng(2)
    emb = clustered(rng, heavy=False)
    gmm, ledger = fit(emb, 0.5)
    assert gmm.history[0]["form"] == "prototypes"
    x, y = gmm.sample(400, np.random.default_rng(3))
    model = train_mlp(x, y, 4, 64, 20, 3e-3, seed=0)
    import torch

    probe = emb.x  # where the data are
    with torch.no_grad():
        predicted = model(torch.as_tensor(probe)).argmax(1).numpy()
    nearest = (probe @ gmm.means[:, 0].T).argmax(1)
    assert (predicted == nearest).mean() > 0.97


def test_removing_any_user_moves_the_class_counts_and_sums_by_at_most_their_recorded_sensitivity():
    emb = clustered(np.random.default_rng(4), users=60, per_user=8)
    _, ledger = fit(emb, 0.2, contribution_bound=2.0)
    recorded = {e.release: e.sensitivity for e in ledger.entries}

    def statistics(keep):
        w = user_weights(emb.users[keep], emb.labels[keep], 4, 2.0)
        return cell_statistics(emb.x[keep], emb.labels[keep], w, 4)

    everyone = statistics(np.ones(len(emb.x), bool))
    worst_counts = worst_sums = 0.0
    for u in np.unique(emb.users):
        without = statistics(emb.users != u)
        worst_counts = max(worst_counts, np.linalg.norm(everyone.counts - without.counts))
        worst_sums = max(worst_sums, np.linalg.norm(everyone.sums - without.sums))
    assert worst_counts <= recorded["class counts"] * (1 + 1e-6)
    assert worst_sums <= recorded["prototype sums"] * (1 + 1e-6)
    assert worst_counts >= 0.99 * 2.0  # the heavy user reaches the bound: the check can fail
