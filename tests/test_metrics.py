"""recall@1 and TAR@FAR on hand-made embeddings, against counts done by hand."""

import numpy as np
import pytest

from fedemb.evaluation.metrics import embedding_metrics, pair_scores, recall_at_1, tar_at_far


def test_recall_at_1_is_leave_one_out():
    e = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]])
    y = np.array([0, 0, 1, 1, 1])
    # nearest other points: 0->1 ok, 1->0 ok, 2->3 ok, 3->2 ok, 4->{1 or 3}: cos to 1 = .78, to 3 = .78...
    e[4] = [0.6, 0.8]  # now nearest to 3
    assert recall_at_1(e, y) == 1.0
    e[4] = [0.8, 0.6]  # now nearest to 1 (wrong class)
    assert recall_at_1(e, y) == pytest.approx(4 / 5)


def test_pair_scores_cover_all_unordered_pairs_once():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 37)
    g, i = pair_scores(rng.normal(size=(37, 4)), y)
    same = sum(int(np.sum(y == c)) * (int(np.sum(y == c)) - 1) // 2 for c in range(3))
    assert len(g) == same and len(g) + len(i) == 37 * 36 // 2


def test_tar_at_far_threshold_never_exceeds_the_target_far():
    impostor = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    genuine = np.array([0.95, 0.85, 0.75, 0.65, 0.55])
    # FAR 0.1 of 10 impostors allows 1 false accept: threshold is the 2nd largest (0.8), accept > 0.8
    assert tar_at_far(genuine, impostor, 0.1) == pytest.approx(2 / 5)
    # FAR 0.05 allows 0: threshold 0.9
    assert tar_at_far(genuine, impostor, 0.05) == pytest.approx(1 / 5)
    # ties at the threshold are rejected, so the realised FAR stays <= target
    assert tar_at_far(np.array([0.9]), np.array([0.9, 0.9, 0.1]), 0.34) == 0.0


def test_perfect_embeddings_score_one():
    y = np.repeat(np.arange(5), 20)
    e = np.eye(5)[y] + 0.01 * np.random.default_rng(1).normal(size=(100, 5))
    m = embedding_metrics(e, y)
    assert m["recall_at_1"] == 1.0 and m["tar_at_far_1e-3"] == 1.0 and m["tar_at_far_1e-1"] == 1.0


def test_blocked_computation_matches_direct(monkeypatch):
    import fedemb.evaluation.metrics as metrics

    rng = np.random.default_rng(2)
    e, y = rng.normal(size=(300, 8)), rng.integers(0, 6, 300)
    full = metrics.embedding_metrics(e, y)
    monkeypatch.setattr(metrics, "BLOCK", 7)
    assert metrics.embedding_metrics(e, y) == pytest.approx(full)
