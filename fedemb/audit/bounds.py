"""From canary scores to an empirical ε lower bound with a stated confidence.

A DP mechanism satisfies, for every test that says "canary present" when the score reaches τ,
TPR ≤ e^ε · FPR + δ. So ε ≥ ln((TPR − δ) / FPR). With finitely many trials TPR and FPR are only
estimated: Clopper–Pearson bounds (TPR from below, FPR from above, each at confidence 1 − α/2) make
the bound hold with probability at least 1 − α (Jagielski et al. 2020, Nasr et al. 2021).

Choosing τ on the same trials would overfit the threshold, so the trials are split: τ is chosen on the
first half of each world's scores and the bound is evaluated on the second half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """One-sided bounds (lower, upper), each holding with probability 1 − alpha."""
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return lower, upper


def epsilon_at(with_scores: np.ndarray, without_scores: np.ndarray, threshold: float, delta: float,
               alpha: float) -> tuple[float, float, float]:
    """(ε lower bound, TPR lower bound, FPR upper bound) for the test `score >= threshold`."""
    tp = int(np.sum(with_scores >= threshold))
    fp = int(np.sum(without_scores >= threshold))
    tpr_lo, _ = clopper_pearson(tp, len(with_scores), alpha / 2)
    _, fpr_hi = clopper_pearson(fp, len(without_scores), alpha / 2)
    if tpr_lo - delta <= 0:
        return 0.0, tpr_lo, fpr_hi
    return max(0.0, math.log((tpr_lo - delta) / fpr_hi)), tpr_lo, fpr_hi


@dataclass
class EpsilonBound:
    epsilon: float  # the lower bound (0 when the audit found nothing)
    confidence: float
    threshold: float
    tpr_lower: float
    fpr_upper: float
    evaluation_trials: int  # per world


def epsilon_lower_bound(with_scores, without_scores, delta: float, confidence: float = 0.95) -> EpsilonBound:
    with_scores, without_scores = np.asarray(with_scores, float), np.asarray(without_scores, float)
    alpha = 1 - confidence
    half_w, half_o = len(with_scores) // 2, len(without_scores) // 2
    pick_w, eval_w = with_scores[:half_w], with_scores[half_w:]
    pick_o, eval_o = without_scores[:half_o], without_scores[half_o:]
    observed = np.unique(np.concatenate([pick_w, pick_o]))
    candidates = (observed[:-1] + observed[1:]) / 2 if len(observed) > 1 else observed  # mid-gap thresholds
    best_eps, best_tau = -1.0, float(observed.max()) if len(observed) else 0.0
    for tau in candidates:
        eps, _, _ = epsilon_at(pick_w, pick_o, tau, delta, alpha)
        if eps > best_eps:
            best_eps, best_tau = eps, float(tau)
    eps, tpr_lo, fpr_hi = epsilon_at(eval_w, eval_o, best_tau, delta, alpha)
    return EpsilonBound(eps, confidence, best_tau, tpr_lo, fpr_hi, min(len(eval_w), len(eval_o)))
