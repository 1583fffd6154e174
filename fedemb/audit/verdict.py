"""An audit's outcome: its ε lower bound against the claim, the verdict, and the exit code that says it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedemb.audit.bounds import EpsilonBound
from fedemb.audit.plan import AuditPlan

EXIT_CODES = {"consistent": 0, "violation": 1, "inconclusive": 3}  # 2: bad options or config (the CLI's errors)


@dataclass
class AuditResult:
    plan: AuditPlan
    bound: EpsilonBound | None  # None: no run was made, the trials could not have decided
    canary_norm: float
    others: str
    inclusion_observed: float | None = None  # share of drawn sampling keys that picked the canary
    with_scores: list[float] = field(default_factory=list, repr=False)
    without_scores: list[float] = field(default_factory=list, repr=False)

    @property
    def claimed_epsilon(self) -> float:
        return self.plan.claimed_epsilon

    @property
    def delta(self) -> float:
        return self.plan.delta

    @property
    def verdict(self) -> str:
        """violation: the lower bound exceeds the claim; inconclusive: the trials could not have shown
        that (the claim is at or above the reachable bound); consistent otherwise."""
        if self.bound is not None and self.bound.epsilon > self.claimed_epsilon:
            return "violation"
        return "consistent" if self.plan.decidable else "inconclusive"

    @property
    def consistent(self) -> bool:
        """The audit could have found more leakage than the accountant claims, and did not."""
        return self.verdict == "consistent"

    def summary(self) -> str:
        """The verdict in words; for an inconclusive audit, how many trials would decide."""
        p = self.plan
        claim = f"the claimed ε {p.claimed_epsilon:.3g} at δ = {p.delta:.3g}"
        found = (f"ε lower bound {self.bound.epsilon:.3g} (confidence {p.confidence:g})"
                 if self.bound is not None else "")
        if self.verdict == "violation":
            return f"violation: {found} EXCEEDS {claim}"
        if self.verdict == "consistent":
            return f"consistent: {found} is consistent with {claim}"
        measured = f" (measured: {found})" if found else " (no run made)"
        if not math.isfinite(p.claimed_epsilon):
            return f"inconclusive{measured}: {claim} is infinite; no audit can contradict it"
        text = (f"inconclusive{measured}: {claim} is at or above {p.reachable_epsilon:.3g}, the largest bound "
                f"that {p.with_trials} runs with the canary and {p.without_trials} without could show")
        if p.conditioned and p.inclusion < 1:
            text += f" (the canary takes part in {p.inclusion:.3g} of the runs with it)"
        needed, cheapest = p.trials_to_decide, p.cheapest_trials(10**7)
        if needed is None or cheapest is None:
            return text + "; no number of trials up to 10^7 per world could decide"
        text += (f"; {needed} trials per world could decide (--trials {needed}), or --trials auto: "
                 f"{cheapest[0]} runs with the canary and {cheapest[1]} without")
        return text + (f", more than --max-trials {p.max_trials}" if max(cheapest) > p.max_trials else "")

    def to_json(self) -> dict:
        b, p = self.bound, self.plan
        found = ({"epsilon_lower_bound": b.epsilon, "threshold": b.threshold, "tpr_lower": b.tpr_lower,
                  "fpr_upper": b.fpr_upper, "evaluation_trials_per_world": b.evaluation_trials} if b else
                 {"epsilon_lower_bound": None})
        return {"verdict": self.verdict, "consistent": self.consistent, **p.to_json(), **found,
                "trials_per_world": p.with_trials if p.with_trials == p.without_trials else None,
                "canary_norm_in_clip_norms": self.canary_norm, "others": self.others,
                "canary_inclusion_observed": self.inclusion_observed,
                "with_canary_scores": self.with_scores, "without_canary_scores": self.without_scores}
