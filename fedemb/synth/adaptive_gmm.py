"""A DP mixture whose detail follows the budget: prototypes at low ε, clusters and covariances at high ε.

The stage first releases the user-bounded class counts (a small share of its budget). From those noisy
counts and the noise the rest of the budget would put on the cluster sums, it predicts the noise on one
cluster's mean, ‖noise‖ ≈ z_sums · B · r · √d / (n_c / K), and keeps the largest K ≤ `synth.clusters`
for which that stays below `synth.mean_noise_tolerance` in every class:

- K = 1, the prototype form: the rest of the budget goes to the per-class sums alone (the release of
  DP prototypes). Every class is one isotropic Gaussian around its prototype direction at one common
  norm, so a classifier trained on the samples learns the bisectors, which is what nearest-prototype
  classification does; the noise is what DP prototypes at (nearly) the stage's ε get.
- K > 1, the detailed form: DP-Lloyd with K clusters per class and the configured covariance
  (fedemb.synth.gmm), on the rest of the budget.

The choice reads only released values (the noisy counts) and public settings: post-processing. The
stage's releases still compose to its ε (fedemb.synth.budget): the counts' share plus the rest.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from fedemb.config import SynthConfig
from fedemb.privacy.release import LedgerStage
from fedemb.synth.baselines import dp_prototypes
from fedemb.synth.budget import split_noise_multiplier
from fedemb.synth.contribution import cell_statistics, count_sensitivity, sum_sensitivity, user_weights
from fedemb.synth.embedded import RADIUS, Embedded
from fedemb.synth.gmm import ReleasedGMM, fit_dp_gmm, release_shares

PROTOTYPE_NORM = 0.5  # the common norm of the prototype form's means: any value gives the same bisectors


def predicted_mean_noise(counts: np.ndarray, clusters: int, z_sums: float, bound: float, dim: int) -> float:
    """The largest expected noise norm on one cluster's mean over the classes, from their noisy counts."""
    per_cluster = np.maximum(np.asarray(counts, dtype=np.float64), 1e-9) / clusters
    return float((z_sums * sum_sensitivity(bound, RADIUS) * math.sqrt(dim) / per_cluster).max())


def choose_clusters(counts: np.ndarray, z_rest: float, s: SynthConfig, dim: int) -> int:
    """The largest K ≤ s.clusters whose cluster means would stay within the tolerance; 1 otherwise."""
    for k in range(s.clusters, 1, -1):
        detailed = copy.copy(s)
        detailed.clusters = k
        z_sums = z_rest / math.sqrt(release_shares(detailed)["final sums"]) if z_rest > 0 else 0.0
        if predicted_mean_noise(counts, k, z_sums, s.contribution_bound, dim) <= s.mean_noise_tolerance:
            return k
    return 1


def fit_mixture(emb: Embedded, num_classes: int, s: SynthConfig, z_stage: float, stage: LedgerStage,
                rng: np.random.Generator, public: Embedded | None = None) -> ReleasedGMM:
    """The mixture `synth.mixture` asks for, released into `stage`."""
    fit = fit_adaptive_gmm if s.mixture == "adaptive" else fit_dp_gmm
    return fit(emb, num_classes, s, z_stage, stage, rng, public)


def fit_adaptive_gmm(emb: Embedded, num_classes: int, s: SynthConfig, z_stage: float, stage: LedgerStage,
                     rng: np.random.Generator, public: Embedded | None = None) -> ReleasedGMM:
    """Releases into `stage`: the class counts, then the prototype form's sums or the detailed mixture."""
    C, d, B = num_classes, emb.dim, s.contribution_bound
    if z_stage > 0:
        z = split_noise_multiplier(z_stage, {"counts": s.budget_decision, "rest": 1 - s.budget_decision})
    else:
        z = {"counts": 0.0, "rest": 0.0}
    exact_counts = cell_statistics(emb.x, emb.labels, user_weights(emb.users, emb.labels, C, B), C).counts
    counts = stage.gaussian("class counts", exact_counts, z["counts"], count_sensitivity(B),
                            "Gaussian noise on the per-class counts (the mixture's detail is chosen from them)",
                            {"cells": C, "contribution_bound": B, "share": s.budget_decision})
    clusters = choose_clusters(counts, z["rest"], s, d)
    decision = {"release": "class counts", "noisy_counts": np.asarray(counts).tolist(), "clusters": clusters,
                "form": "prototypes" if clusters == 1 else "detailed"}
    if clusters == 1:
        directions = dp_prototypes(emb, C, z["rest"], B, stage)  # the release of DP prototypes
        gmm = ReleasedGMM(np.ones((C, 1)), np.asarray(counts, dtype=np.float64).reshape(C, 1),
                          PROTOTYPE_NORM * directions[:, None, :], "isotropic",
                          iso_std=np.full((C, 1), math.sqrt((RADIUS**2 - PROTOTYPE_NORM**2) / d)))
        gmm.history = [decision]
        return gmm
    detailed = copy.copy(s)
    detailed.clusters = clusters
    gmm = fit_dp_gmm(emb, num_classes, detailed, z["rest"], stage, rng, public)
    gmm.history = [decision] + gmm.history
    return gmm
