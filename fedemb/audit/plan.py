"""What an audit can show before any run: the accountant's claim, the canary's chance of taking part,
and the largest ε lower bound a number of trials could reach (fedemb.audit.bounds).

Where the canary is measured. With Poisson sampling (rate q) the canary takes part in a run of R
rounds with probability p = 1 − (1 − q)^R only, and a run it skips is distributed exactly like a run
without it (each user is in independently of the others, and grouping is keyed per user). So the
runs with the canary are drawn among those in which it takes part (rejection sampling of the sampling
key, the mechanism untouched), and the bound weighs their TPR by p. That is still a bound on the ε of the whole mechanism, amplification
by sampling included, against the accountant's claim for it. Other sampling methods change who else
takes part when the canary does, so there the runs with the canary are not conditioned and the
inclusion probability (measured on the sampler alone) caps what they can show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedemb.audit.bounds import cheapest_trials, reachable_epsilon, trials_to_decide
from fedemb.audit.canary import INCLUSION_KEYS, canary_user, includes_canary
from fedemb.config import Config
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import make_sampler
from fedemb.privacy.streams import STREAM_AUDIT
from fedemb.run_setup import prepare_run

MAX_TRIALS = 20_000  # per world, for trials = "auto"
INCLUSION_DRAWS = 2000  # sampler-only runs that measure the inclusion probability of non-Poisson samplers


@dataclass
class AuditPlan:
    """What the audit can show before any run: the claim, the canary's inclusion and the reachable bound."""

    claimed_epsilon: float
    delta: float
    rounds: int
    mechanism: str
    confidence: float
    inclusion: float  # probability that the canary takes part in at least one round
    conditioned: bool  # runs with the canary are drawn among those in which it takes part (Poisson sampling)
    with_trials: int
    without_trials: int
    max_trials: int = MAX_TRIALS

    @property
    def _design(self) -> dict:
        """The weight of TPR in the bound, and the TPR a perfect separation can reach."""
        return ({"inclusion": self.inclusion, "tpr_cap": 1.0} if self.conditioned
                else {"inclusion": 1.0, "tpr_cap": self.inclusion})

    @property
    def reachable_epsilon(self) -> float:
        """The largest bound these trials can show (a perfect separation)."""
        return reachable_epsilon(self.with_trials, self.without_trials, self.delta, self.confidence, **self._design)

    @property
    def possible_epsilon(self) -> float:
        """The largest bound any outcome can give; above the reachable one only if runs with the canary are
        not conditioned on its inclusion (a sampler that picks it more often than designed would show)."""
        return reachable_epsilon(self.with_trials, self.without_trials, self.delta, self.confidence,
                                 inclusion=self._design["inclusion"])

    @property
    def decidable(self) -> bool:
        return self.claimed_epsilon < self.reachable_epsilon

    @property
    def trials_to_decide(self) -> int | None:
        """Trials per world whose reachable bound exceeds the claim (None: not within 10^7)."""
        if not math.isfinite(self.claimed_epsilon):
            return None
        return trials_to_decide(self.claimed_epsilon, self.delta, self.confidence, **self._design)

    def cheapest_trials(self, cap: int | None = None) -> tuple[int, int] | None:
        """(with, without) runs, fewest in all, whose reachable bound exceeds the claim; None beyond `cap`."""
        if not math.isfinite(self.claimed_epsilon):
            return None
        return cheapest_trials(self.claimed_epsilon, self.delta, self.confidence, cap=cap or self.max_trials,
                               **self._design)

    def to_json(self) -> dict:
        cheapest = self.cheapest_trials()
        return {"claimed_epsilon": self.claimed_epsilon, "delta": self.delta, "rounds": self.rounds,
                "mechanism": self.mechanism, "confidence": self.confidence,
                "canary_inclusion_probability": self.inclusion, "conditioned_on_inclusion": self.conditioned,
                "trials_with_canary": self.with_trials, "trials_without_canary": self.without_trials,
                "reachable_epsilon": self.reachable_epsilon, "trials_per_world_to_decide": self.trials_to_decide,
                "cheapest_trials_to_decide": list(cheapest) if cheapest else None}


def accountant_claim(cfg: Config, setup, rounds: int) -> tuple[float, str]:
    """The accountant's ε for `rounds` rounds, computed as the strategy's ledger computes it."""
    mechanism = make_mechanism(cfg, setup.privacy, GaussianNoise(0.0, 0), setup.virtual_clients)
    ledger = PrivacyLedger(None, setup.privacy.delta, setup.privacy.accountant)
    for r in range(1, rounds + 1):
        ledger.record(mechanism.ledger_entry(r, 0))
    return ledger.epsilon, mechanism.name


def plan_audit(cfg: Config, trials: int | str = 200, rounds: int = 1, confidence: float = 0.95, seed: int = 0,
               max_trials: int = MAX_TRIALS, setup=None) -> AuditPlan:
    """The claim and what `trials` per world can show; trials = "auto": the fewest runs that could
    contradict the claim (at most `max_trials` per world; the plan is left undecidable beyond)."""
    setup = setup or prepare_run(cfg)
    claim, name = accountant_claim(cfg, setup, rounds)
    poisson = cfg.sampling.method == "poisson"
    if poisson:
        inclusion = 1 - (1 - cfg.sampling.rate) ** rounds
    else:
        users = setup.splits.train.user_ids
        canary = canary_user(users)
        hits = sum(includes_canary(make_sampler(keyed_seed(seed, STREAM_AUDIT, INCLUSION_KEYS, i), cfg.sampling,
                                                setup.virtual_clients), canary, users, rounds)
                   for i in range(INCLUSION_DRAWS))
        inclusion = hits / INCLUSION_DRAWS
    plan = AuditPlan(claim, setup.privacy.delta, rounds, name, confidence, inclusion, poisson, 0, 0, max_trials)
    if trials == "auto":
        sized = plan.cheapest_trials()
        plan.with_trials, plan.without_trials = sized or (max_trials, max_trials)
    else:
        plan.with_trials = plan.without_trials = int(trials)
    return plan
