"""A differentially private Gaussian mixture per class in embedding space.

DP-Lloyd (k-means) runs on all classes at once: every (class, cluster) pair is a cell, and each
iteration releases noisy per-cell counts and sums (user-level bounded, fedemb.synth.contribution).
Centres start from random points around a DP class mean (`mean`), from data-independent random points
(`random`), or from k-means on public embeddings (`public`). The final release is per-cell weights (counts), means (sums) and covariances (second
moments), turned into a mixture by post-processing alone: means clipped to the ball, covariances
projected onto the PSD cone with an eigenvalue floor.

Every release goes through the stage's `gaussian` (fedemb.privacy.release), which writes its ledger entry
before its noise is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedemb.config import SynthConfig
from fedemb.errors import DataError
from fedemb.privacy.release import EntryNoise, LedgerStage
from fedemb.synth.budget import split_noise_multiplier
from fedemb.synth.contribution import (cell_statistics, count_sensitivity, second_moment_sensitivity,
                                       sum_sensitivity, user_weights_by_index)
from fedemb.synth.embedded import RADIUS, Embedded

RELIABLE_COUNT_IN_STDS = 2.0  # a cell whose noisy count is below this many noise stds is not trusted


@dataclass
class ReleasedGMM:
    """What leaves the private side: for each class c and cluster k a weight, a mean and a covariance
    (diagonal stds, or eigenvectors with their scales plus an isotropic rest)."""

    weights: np.ndarray  # (C, K), rows sum to 1
    counts: np.ndarray  # (C, K) noisy
    means: np.ndarray  # (C, K, d)
    covariance: str
    diag_std: np.ndarray | None = None  # (C, K, d)
    eigvecs: np.ndarray | None = None  # (C, K, d, r)
    eig_std: np.ndarray | None = None  # (C, K, r)
    iso_std: np.ndarray | None = None  # (C, K)
    history: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def sample(self, per_class: int, rng: np.random.Generator, project: bool = True) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(self.num_classes), per_class)
        return self.sample_for(labels, rng, project), labels

    def sample_for(self, labels: np.ndarray, rng: np.random.Generator, project: bool = True) -> np.ndarray:
        """One sample of its class's mixture per label, (n, d) float32, on the sphere with `project`."""
        x = np.zeros((len(labels), self.means.shape[2]), dtype=np.float64)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            x[rows] = self._class_samples(int(c), len(rows), rng)
        x = x.astype(np.float32)
        if project:
            x = RADIUS * x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _class_samples(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        K, d = self.means.shape[1:]
        ks = rng.choice(K, size=n, p=self.weights[c])
        x = self.means[c, ks].copy()
        if self.diag_std is not None:
            x += self.diag_std[c, ks] * rng.standard_normal((n, d))
        if self.iso_std is not None:
            g = rng.standard_normal((n, d))
            if self.eigvecs is not None:  # isotropic only off the kept eigenvectors
                u = self.eigvecs[c, ks]
                g -= np.einsum("ndr,nr->nd", u, np.einsum("ndr,nd->nr", u, g))
            x += self.iso_std[c, ks][:, None] * g
        if self.eigvecs is not None:
            g = rng.standard_normal((n, self.eig_std.shape[-1]))
            x += np.einsum("ndr,nr->nd", self.eigvecs[c, ks], self.eig_std[c, ks] * g)
        return x

    def class_means(self) -> np.ndarray:
        """(C, d) unit rows: each class's mixture mean, a class prototype."""
        means = np.einsum("ck,ckd->cd", self.weights, self.means)
        return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        np.savez(path, covariance=np.array(self.covariance), **arrays)


def fit_dp_gmm(emb: Embedded, num_classes: int, settings: SynthConfig, z_stage: float, stage: LedgerStage,
               rng: np.random.Generator, public: Embedded | None = None) -> ReleasedGMM:
    """Releases into `stage`; `rng` draws only data-independent things (starting directions, k-means on
    public rows), never noise."""
    s = settings
    C, K, d = num_classes, s.clusters, emb.dim
    check_fit_inputs(emb, num_classes, s, public)
    rows_of_class = [np.flatnonzero(emb.labels == c) for c in range(C)]
    shares = release_shares(s)
    z = split_noise_multiplier(z_stage, shares) if z_stage > 0 else {name: 0.0 for name in shares}
    B = s.contribution_bound
    user_index = np.unique(emb.users, return_inverse=True)[1]
    history: list[dict] = []

    def noisy_cell_statistics(step: str, cells: np.ndarray, num_cells: int, second: str):
        weights = user_weights_by_index(user_index, cells, num_cells, B)
        stats = cell_statistics(emb.x, cells, weights, num_cells, second)
        details = {"cells": num_cells, "dim": d, "contribution_bound": B, "radius": RADIUS}

        def noisy(key: str, exact: np.ndarray, sensitivity: float) -> np.ndarray:
            name = f"{step} {key}"
            return stage.gaussian(name, exact, z[name], sensitivity, f"Gaussian noise on the per-cell {key}",
                                  details | {"share": shares[name]}, _unit_noise)

        counts = noisy("counts", stats.counts, count_sensitivity(B))
        sums = noisy("sums", stats.sums, sum_sensitivity(B, RADIUS))
        moments = None
        if stats.second is not None:
            moments = noisy("second", stats.second, second_moment_sensitivity(B, RADIUS))
        return counts, sums, moments, z[f"{step} counts"] * count_sensitivity(B)

    if K > 1 and s.init == "public":
        centres = _public_centres(public, C, K, rng)
    elif K > 1 and s.init == "random":
        centres = _perturbed(np.zeros((C, d)), K, rng)  # data-independent: random points at radius r / 2
    elif K > 1:
        counts, sums, _, count_std = noisy_cell_statistics("init", emb.labels, C, "none")
        means = _means(counts, sums, count_std)
        centres = _perturbed(means, K, rng)
        history.append({"release": "init", "noisy_counts": counts.tolist()})
    else:
        centres = np.zeros((C, 1, d))
    for t in range(s.iterations if K > 1 else 0):
        cells = emb.labels * K + _assign(emb.x, rows_of_class, centres)
        counts, sums, _, count_std = noisy_cell_statistics(f"lloyd {t + 1}", cells, C * K, "none")
        means = _means(counts, sums, count_std).reshape(C, K, d)
        reliable = (counts >= RELIABLE_COUNT_IN_STDS * count_std).reshape(C, K)
        centres = np.where(reliable[..., None], means, centres)
        history.append({"release": f"lloyd {t + 1}", "noisy_counts": counts.reshape(C, K).tolist()})

    cells = emb.labels * K + (_assign(emb.x, rows_of_class, centres) if K > 1 else 0)
    second = {"isotropic": "none", "diag": "diag"}.get(s.covariance, "full")
    counts, sums, moments, count_std = noisy_cell_statistics("final", cells, C * K, second)
    gmm = _mixture(counts.reshape(C, K), sums.reshape(C, K, d), moments, count_std, s)
    gmm.history = history + [{"release": "final", "noisy_counts": counts.reshape(C, K).tolist()}]
    return gmm


def check_fit_inputs(emb: Embedded, num_classes: int, s: SynthConfig, public: Embedded | None) -> None:
    if len(emb) == 0:
        raise DataError("no private embeddings to fit")
    if emb.labels.max() >= num_classes:
        raise DataError(f"labels go up to {emb.labels.max()}, but there are {num_classes} classes")
    for c in range(num_classes):
        users = len(np.unique(emb.users[emb.labels == c]))
        if users < s.clusters:
            raise DataError(f"class {c} has {users} users, fewer than synth.clusters = {s.clusters}")
    if s.clusters > 1 and s.init == "public":
        if public is None or len(public) == 0:
            raise DataError("synth.init = 'public' needs public embeddings (data.public_users > 0)")
        if public.dim != emb.dim:
            raise DataError(f"public embeddings have dimension {public.dim}, private ones {emb.dim}")
        for c in range(num_classes):
            if (public.labels == c).sum() < s.clusters:
                raise DataError(f"class {c} has fewer public embeddings than synth.clusters = {s.clusters}")


def _lloyd_stages(s: SynthConfig) -> list[str]:
    if s.clusters == 1:
        return []
    return (["init"] if s.init == "mean" else []) + [f"lloyd {t + 1}" for t in range(s.iterations)]


def release_shares(s: SynthConfig) -> dict[str, float]:
    """Every release of the fit, by name, with its share of the stage's budget (they sum to 1)."""
    shares = {"final counts": s.budget_counts, "final sums": s.budget_means}
    if s.covariance != "isotropic":
        shares["final second"] = s.budget_covariances
    stages = _lloyd_stages(s)
    part = s.budget_counts + s.budget_means
    for stage in stages:
        shares[f"{stage} counts"] = s.budget_lloyd / len(stages) * s.budget_counts / part
        shares[f"{stage} sums"] = s.budget_lloyd / len(stages) * s.budget_means / part
    total = sum(shares.values())
    return {name: share / total for name, share in shares.items()}


def _unit_noise(noise: EntryNoise, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise; for (cells, d, d) matrices symmetric: the upper triangle (diagonal
    included) is drawn once and mirrored, so the release is that triangle."""
    if len(shape) < 3:
        return noise.normal(shape)
    upper = np.triu(noise.normal(shape))
    return upper + np.triu(upper, 1).transpose(0, 2, 1)


def _means(counts: np.ndarray, sums: np.ndarray, count_std: float) -> np.ndarray:
    """Noisy sum / noisy count, the count floored where the noise would dominate; inside the ball."""
    floor = max(RELIABLE_COUNT_IN_STDS * count_std, 1e-6)
    means = sums / np.maximum(counts, floor)[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return means * np.minimum(1.0, RADIUS / np.maximum(norms, 1e-12))


def _perturbed(class_means: np.ndarray, K: int, rng: np.random.Generator) -> np.ndarray:
    """K starting centres per class around its DP mean: data-independent random directions, scaled by
    half the spread that points on the sphere have around that mean (E‖x − μ‖² = r² − ‖μ‖²)."""
    C, d = class_means.shape
    spread = np.sqrt(np.maximum(RADIUS**2 - (class_means**2).sum(1), 0.05))
    directions = rng.standard_normal((C, K, d))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    return class_means[:, None, :] + 0.5 * spread[:, None, None] * directions


def _public_centres(public: Embedded, C: int, K: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.cluster import KMeans

    centres = []
    for c in range(C):
        km = KMeans(n_clusters=K, n_init=4, random_state=int(rng.integers(2**31)))
        centres.append(km.fit(public.x[public.labels == c]).cluster_centers_)
    return np.stack(centres)


def _assign(x: np.ndarray, rows_of_class: list[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """The nearest centre of its own class, for every row."""
    out = np.zeros(len(x), dtype=np.int64)
    for c, rows in enumerate(rows_of_class):
        if len(rows):
            mu = centres[c].astype(np.float32)
            out[rows] = np.argmin((mu**2).sum(1)[None, :] - 2 * (x[rows] @ mu.T), axis=1)
    return out


def _mixture(counts: np.ndarray, sums: np.ndarray, moments: np.ndarray | None, count_std: float,
             s: SynthConfig) -> ReleasedGMM:
    C, K, d = sums.shape
    floor = max(RELIABLE_COUNT_IN_STDS * count_std, 1e-6)
    reliable = counts >= floor
    best = np.argmax(counts, axis=1)
    reliable[np.arange(C), best] = True  # every class keeps at least its largest cluster
    weights = np.where(reliable, np.maximum(counts, 0), 0.0)
    weights[np.arange(C), best] = np.maximum(weights[np.arange(C), best], 1e-12)
    weights /= weights.sum(1, keepdims=True)
    means = _means(counts.reshape(-1), sums.reshape(-1, d), count_std).reshape(C, K, d)
    denominators = np.maximum(counts, floor)
    gmm = ReleasedGMM(weights, counts, means, s.covariance)
    if s.covariance == "isotropic":
        gmm.iso_std = np.sqrt(np.maximum((RADIUS**2 - (means**2).sum(2)) / d, s.eigenvalue_floor))
    elif s.covariance == "diag":
        var = moments.reshape(C, K, d) / denominators[..., None] - means**2
        gmm.diag_std = np.sqrt(np.maximum(var, s.eigenvalue_floor))
    else:
        cov = moments.reshape(C, K, d, d) / denominators[..., None, None] - np.einsum("cki,ckj->ckij", means, means)
        values, vectors = np.linalg.eigh((cov + cov.transpose(0, 1, 3, 2)) / 2)  # ascending
        values = np.maximum(values, s.eigenvalue_floor)
        if s.covariance == "full":
            gmm.eigvecs, gmm.eig_std = vectors, np.sqrt(values)
        else:
            r = min(s.rank, d - 1)
            gmm.eigvecs, gmm.eig_std = vectors[..., -r:], np.sqrt(values[..., -r:])
            gmm.iso_std = np.sqrt(np.maximum(values[..., :-r].mean(-1), s.eigenvalue_floor))
    return gmm
