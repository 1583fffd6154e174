"""From canary scores to an empirical ε lower bound with a stated confidence, and what a trial count can reach.

A DP mechanism satisfies, for every test that says "canary present" when the score reaches τ,
TPR ≤ e^ε · FPR + δ. So ε ≥ ln((TPR − δ) / FPR). With finitely many trials TPR and FPR are only
estimated: Clopper–Pearson bounds (TPR from below, FPR from above, each at confidence 1 − α/2) make
the bound hold with probability at least 1 − α (Jagielski et al. 2020, Nasr et al. 2021).

Inclusion. With Poisson sampling the canary takes part in a run with some probability p (1 − (1 − q)^R
over R rounds), independently of everything else, and a run it does not take part in is distributed
exactly like a run without it. So the world with the canary is the mixture
P_with = p·P_in + (1 − p)·P_without, and for any test

    e^ε ≥ (P_with(S) − δ) / P_without(S) = (p·TPR_in − δ) / FPR + (1 − p),

where TPR_in is the rate on runs in which the canary took part. With p·TPR_in > δ the right side falls as FPR grows, so
a lower bound on TPR_in and an upper bound on FPR keep it a lower bound on the ε of the whole
mechanism, sampling included. `inclusion` is that p (1 when TPR is measured on unconditioned runs).

Choosing τ on the same trials would overfit the threshold, so the trials are split: τ is chosen on the
first fifth of each world's scores (`pick_size`) and the bound is evaluated on the rest.

Reachable bound. However well the two worlds separate, n trials cannot show a TPR above (α/2)^(1/n)
or an FPR below 1 − (α/2)^(1/n): `reachable_epsilon` is the bound of a perfect separation, the most a
trial count can show. The audit cannot contradict a claim at or above it, and `trials_to_decide` and
`cheapest_trials` say how many trials could.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

PICK_FRACTION = 0.2  # of each world's trials, to choose the threshold on (0.15 to 0.33 beat 0.5 in simulations)


def _clopper_pearson(successes, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised one-sided bounds (lower, upper); real-valued successes (expected counts) allowed."""
    s = np.asarray(successes, dtype=float)
    inner = np.clip(s, 1e-12, trials - 1e-12)
    edge = alpha ** (1 / trials)  # all successes: lower = edge; none: upper = 1 − edge (closed forms)
    lower = np.where(s <= 0, 0.0, np.where(s >= trials, edge, beta.ppf(alpha, inner, trials - inner + 1)))
    upper = np.where(s >= trials, 1.0, np.where(s <= 0, 1 - edge, beta.ppf(1 - alpha, inner + 1, trials - inner)))
    return lower, upper


def clopper_pearson(successes: float, trials: int, alpha: float) -> tuple[float, float]:
    """One-sided bounds (lower, upper), each holding with probability 1 − alpha."""
    if successes <= 0:  # the closed forms at the two ends: exact, and fast for planning
        return 0.0, 1 - alpha ** (1 / trials)
    if successes >= trials:
        return alpha ** (1 / trials), 1.0
    lower, upper = _clopper_pearson(successes, trials, alpha)
    return float(lower), float(upper)


def epsilon_from_rates(tpr_lower: float, fpr_upper: float, delta: float, inclusion: float = 1.0) -> float:
    """ε ≥ ln((p·TPR − δ)/FPR + 1 − p) with p = `inclusion`; 0 when the bound shows nothing."""
    excess = inclusion * tpr_lower - delta
    if excess <= 0:
        return 0.0
    return max(0.0, math.log(excess / fpr_upper + 1 - inclusion))


def epsilon_at(with_scores: np.ndarray, without_scores: np.ndarray, threshold: float, delta: float,
               alpha: float, inclusion: float = 1.0) -> tuple[float, float, float]:
    """(ε lower bound, TPR lower bound, FPR upper bound) for the test `score >= threshold`."""
    tp = int(np.sum(with_scores >= threshold))
    fp = int(np.sum(without_scores >= threshold))
    tpr_lo, _ = clopper_pearson(tp, len(with_scores), alpha / 2)
    _, fpr_hi = clopper_pearson(fp, len(without_scores), alpha / 2)
    return epsilon_from_rates(tpr_lo, fpr_hi, delta, inclusion), tpr_lo, fpr_hi


def pick_size(trials: int) -> int:
    """How many of a world's trials choose the threshold; the others evaluate it."""
    return max(1, int(trials * PICK_FRACTION))


def reachable_epsilon(with_trials: int, without_trials: int, delta: float, confidence: float = 0.95,
                      inclusion: float = 1.0, tpr_cap: float = 1.0) -> float:
    """The bound of a perfect separation on the evaluation trials: every run with the canary that can
    be told apart is (all of them, or a fraction `tpr_cap` for runs not conditioned on the canary's
    inclusion), and no run without it is. With tpr_cap = 1 no outcome of these trials gives more."""
    alpha = 1 - confidence
    n_w, n_o = with_trials - pick_size(with_trials), without_trials - pick_size(without_trials)
    if n_w < 1 or n_o < 1:
        return 0.0
    tpr_lo, _ = clopper_pearson(tpr_cap * n_w, n_w, alpha / 2)
    _, fpr_hi = clopper_pearson(0, n_o, alpha / 2)
    return epsilon_from_rates(tpr_lo, fpr_hi, delta, inclusion)


def trials_to_decide(claimed_epsilon: float, delta: float, confidence: float = 0.95, inclusion: float = 1.0,
                     tpr_cap: float = 1.0, cap: int = 10**7) -> int | None:
    """The fewest trials per world whose reachable bound exceeds the claim (None: more than `cap`)."""
    return _first(lambda n: reachable_epsilon(n, n, delta, confidence, inclusion, tpr_cap) > claimed_epsilon, 2, cap)


def cheapest_trials(claimed_epsilon: float, delta: float, confidence: float = 0.95, inclusion: float = 1.0,
                    tpr_cap: float = 1.0, cap: int = 10**7) -> tuple[int, int] | None:
    """(with, without): the fewest runs in all whose reachable bound exceeds the claim, each world at
    most `cap` (None: impossible). The runs without the canary bound the FPR, which sets the scale;
    the runs with it need far fewer once their TPR bound is close to its cap."""
    def decides(n_w: int, n_o: int) -> bool:
        return reachable_epsilon(n_w, n_o, delta, confidence, inclusion, tpr_cap) > claimed_epsilon

    floor = _first(lambda n: decides(cap, n), 2, cap)  # the fewest runs without the canary, whatever the rest
    if floor is None:
        return None
    best: tuple[int, int] | None = None
    n_w = 2
    while n_w <= cap and (best is None or n_w + floor < sum(best)):
        n_o = _first(lambda n: decides(n_w, n), floor, cap)
        if n_o is not None and (best is None or n_w + n_o < sum(best)):
            best = (n_w, n_o)
        n_w += max(1, n_w // 100)
    return best


def _first(holds, low: int, high: int) -> int | None:
    """The smallest n in [low, high] for which the monotone predicate holds (None: not even at high)."""
    if not holds(high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if holds(mid) else (mid + 1, high)
    return low


@dataclass
class EpsilonBound:
    epsilon: float  # the lower bound (0 when the audit found nothing)
    confidence: float
    threshold: float
    tpr_lower: float  # of the runs with the canary (those in which it took part, when inclusion < 1)
    fpr_upper: float
    evaluation_trials: int  # per world (the smaller of the two)
    inclusion: float = 1.0


def choose_threshold(pick_with: np.ndarray, pick_without: np.ndarray, eval_with: int, eval_without: int,
                     delta: float, alpha: float, inclusion: float = 1.0) -> float:
    """The threshold whose rates on the picking trials, if observed on the evaluation trials, would
    give the largest bound; among equally good neighbours, the middle of their range (a clean
    separation puts τ in the middle of the gap, not next to the largest score without the canary)."""
    observed = np.unique(np.concatenate([pick_with, pick_without]))
    if len(observed) < 2:
        return float(observed[0]) if len(observed) else 0.0
    candidates = (observed[:-1] + observed[1:]) / 2
    tpr_lo, _ = _clopper_pearson(_rate_above(pick_with, candidates) * eval_with, eval_with, alpha / 2)
    _, fpr_hi = _clopper_pearson(_rate_above(pick_without, candidates) * eval_without, eval_without, alpha / 2)
    values = np.array([epsilon_from_rates(t, f, delta, inclusion) for t, f in zip(tpr_lo, fpr_hi)])
    first = last = int(np.argmax(values))
    while last + 1 < len(values) and values[last + 1] >= values[first]:
        last += 1
    return float((candidates[first] + candidates[last]) / 2)


def _rate_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The fraction of scores at or above each threshold."""
    return 1 - np.searchsorted(np.sort(scores), thresholds, side="left") / len(scores)


def epsilon_lower_bound(with_scores, without_scores, delta: float, confidence: float = 0.95,
                        inclusion: float = 1.0) -> EpsilonBound:
    with_scores, without_scores = np.asarray(with_scores, float), np.asarray(without_scores, float)
    alpha = 1 - confidence
    k_w, k_o = pick_size(len(with_scores)), pick_size(len(without_scores))
    pick_w, eval_w = with_scores[:k_w], with_scores[k_w:]
    pick_o, eval_o = without_scores[:k_o], without_scores[k_o:]
    tau = choose_threshold(pick_w, pick_o, len(eval_w), len(eval_o), delta, alpha, inclusion)
    eps, tpr_lo, fpr_hi = epsilon_at(eval_w, eval_o, tau, delta, alpha, inclusion)
    return EpsilonBound(eps, confidence, tau, tpr_lo, fpr_hi, min(len(eval_w), len(eval_o)), inclusion)
