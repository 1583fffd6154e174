"""Verification and retrieval metrics on L2-normalised embeddings (cosine similarity).

recall@1: for each example, is its nearest other example (leave-one-out) of the same class?
TAR@FAR: over ALL unordered pairs, genuine = same class. The threshold τ is the (⌊FAR·n_impostor⌋+1)-th
largest impostor score and a pair is accepted when its score is strictly above τ, so the realised
false-accept rate never exceeds FAR; TAR is the fraction of genuine pairs accepted.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from fedemb.monitoring.metric_names import RECALL_AT_1, TAR_AT_FAR

BLOCK = 2048


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    e = l2_normalise(embeddings)
    labels = np.asarray(labels)
    hits = 0
    for start in range(0, len(e), BLOCK):
        sims = e[start:start + BLOCK] @ e.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf
        hits += int(np.sum(labels[np.argmax(sims, axis=1)] == labels[start:start + BLOCK]))
    return hits / len(e)


def pair_scores(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of all unordered pairs i < j, split into genuine and impostor."""
    e = l2_normalise(embeddings)
    labels = np.asarray(labels)
    genuine, impostor = [], []
    for start in range(0, len(e), BLOCK):
        block = e[start:start + BLOCK]
        sims = block @ e[start:].T
        same = labels[start:start + BLOCK, None] == labels[None, start:]
        upper = np.triu(np.ones_like(same, dtype=bool), k=1)
        genuine.append(sims[upper & same])
        impostor.append(sims[upper & ~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    if len(genuine) == 0:
        return float("nan")
    allowed = int(np.floor(far * len(impostor)))
    if allowed >= len(impostor):
        return 1.0
    k = len(impostor) - allowed - 1  # index of the (allowed+1)-th largest in ascending order
    threshold = np.partition(impostor, k)[k]
    return float(np.mean(genuine > threshold))


def embedding_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # Single-threaded BLAS: under `flwr run` the ServerApp is a thread of the simulation process, and
    # NumPy's multi-threaded OpenBLAS there was seen spinning in exec_blas for minutes on a loaded
    # 2-core machine (py-spy). The matrices are small; one thread costs nothing.
    with threadpool_limits(limits=1, user_api="blas"):
        genuine, impostor = pair_scores(embeddings, labels)
        return {RECALL_AT_1: recall_at_1(embeddings, labels),
                **{name: tar_at_far(genuine, impostor, far) for far, name in TAR_AT_FAR.items()}}
