"""Many short runs of the real mechanism, with a canary user and without it.

The canary is one more user of the population. Whenever it is sampled, the virtual client it joins
sends a crafted update instead of training: a fixed random unit direction u (over all shared tensors)
times `canary_norm` clip norms (100 by default), which the node's clipping brings back to norm C; if
clipping were missing anywhere, the canary would stand out by a factor of 100. This is the worst
case the sensitivity argument allows: with k > 1 the canary's virtual client could send anything in
the C-ball. Everything else is the run's own code: sampling, grouping, local training of the other
virtual clients, clipping, reply checks, the mechanism's noise, the fixed denominator. Messages go
through an in-process Grid instead of Ray, so thousands of short runs are affordable.

The score of a run is Σ over its rounds of <released mean update, u>: what an adversary who knows u
and sees the released models would compute.

Where the canary is measured. With Poisson sampling (rate q) the canary takes part in a run of R
rounds with probability p = 1 − (1 − q)^R only, and a run it skips is distributed exactly like a run
without it (every draw is keyed by the user's own id). So the runs with the canary are drawn among
those in which it takes part: each run's sampling key is drawn afresh until the real sampler picks
the canary in some round (rejection sampling, the mechanism untouched), and the bound weighs their
TPR by p (fedemb.audit.bounds). That is still a bound on the ε of the whole mechanism, amplification
by sampling included, against the accountant's claim for it. Other sampling methods change who else
takes part when the canary does, so there the runs with the canary are not conditioned and the
inclusion probability (measured on the sampler alone) caps what they can show.

`others = "silent"`: the other virtual clients send zero updates instead of training. DP must hold
for every data set, including one whose other users' updates are zero, so this is still an audit of
the claim (of sampling, clipping, checks, noise and denominator, not of local training), with a
sharper separation, at a fraction of the cost.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedemb.audit.bounds import (EpsilonBound, cheapest_trials, epsilon_lower_bound, reachable_epsilon,
                                 trials_to_decide)
from fedemb.config import Config
from fedemb.errors import FedembError
from fedemb.federated import STREAM_TRAINING_KEY, prepare_run
from fedemb.inprocess import InProcessGrid
from fedemb.models.embedding_net import shared_state
from fedemb.monitoring.callback import RoundCallback
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import make_sampler
from fedemb.protocol import read_train_message, train_reply
from fedemb.training.client_task import make_task, run_train_assignment

STREAM_AUDIT = 31
_SAMPLING_KEYS, _NOISE_KEYS, _INCLUSION_KEYS = 0, 1, 2  # sub-streams of STREAM_AUDIT
OTHERS = ("trained", "silent")
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


def canary_direction(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    norm = torch.sqrt(sum((v ** 2).sum() for v in raw.values()))
    return {k: v / norm for k, v in raw.items()}


class _Score(RoundCallback):
    def __init__(self, direction: dict[str, torch.Tensor]):
        self.direction = direction
        self.total = 0.0
        self.strategy = None

    def on_run_start(self, strategy, num_rounds):
        self.strategy = strategy

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        release = self.strategy.last_release
        self.total += float(sum((release[k] * u).sum() for k, u in self.direction.items()))


def _includes(sampler, canary: np.ndarray, users: np.ndarray, rounds: int, *, poisson: bool) -> bool:
    """Whether the sampler picks the canary in some round. Poisson draws are per user, so the canary
    alone is asked; other samplers see the whole population, round after round."""
    population = canary if poisson else np.append(users, canary)
    return any(canary[0] in sampler.sample(r, population) for r in range(1, rounds + 1))


def _claim(cfg: Config, setup, rounds: int) -> tuple[float, str]:
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
    claim, name = _claim(cfg, setup, rounds)
    poisson = cfg.sampling.method == "poisson"
    if poisson:
        inclusion = 1 - (1 - cfg.sampling.rate) ** rounds
    else:
        users = setup.splits.train.user_ids
        canary = np.array([int(users.max()) + 1])
        hits = sum(_includes(make_sampler(keyed_seed(seed, STREAM_AUDIT, _INCLUSION_KEYS, i), cfg.sampling,
                                          setup.virtual_clients), canary, users, rounds, poisson=False)
                   for i in range(INCLUSION_DRAWS))
        inclusion = hits / INCLUSION_DRAWS
    plan = AuditPlan(claim, setup.privacy.delta, rounds, name, confidence, inclusion, poisson, 0, 0, max_trials)
    if trials == "auto":
        sized = plan.cheapest_trials()
        plan.with_trials, plan.without_trials = sized or (max_trials, max_trials)
    else:
        plan.with_trials = plan.without_trials = int(trials)
    return plan


def run_audit(cfg: Config, trials: int | str = 200, rounds: int = 1, confidence: float = 0.95,
              canary_norm: float = 100.0, seed: int = 0, others: str = "trained", max_trials: int = MAX_TRIALS,
              measure: bool = False, progress: Callable[[int, int], None] | None = None) -> AuditResult:
    """Plan the audit, and run it unless its trials could not contradict the claim (then the verdict is
    inconclusive without a run; `measure` runs them anyway, for the leakage they measure)."""
    from strategies.dp_fedemb import DPFedEmb
    from strategies.server_optimizer import ServerOptimizer

    if others not in OTHERS:
        raise FedembError(f"others must be one of {', '.join(OTHERS)}, got {others!r}")
    cfg = copy.deepcopy(cfg)
    setup = prepare_run(cfg)  # with the config's own rounds: a calibrated z is the run's z
    cfg.run.rounds, cfg.run.eval_every = rounds, 0
    plan = plan_audit(cfg, trials, rounds, confidence, seed, max_trials, setup)
    undecidable = plan.claimed_epsilon >= plan.possible_epsilon or (trials == "auto" and not plan.decidable)
    if undecidable and not (measure and trials != "auto"):
        return AuditResult(plan, None, canary_norm, others)  # no outcome of these runs could decide

    privacy, slots = setup.privacy, setup.virtual_clients
    users = setup.splits.train.user_ids
    canary = np.array([int(users.max()) + 1])
    initial = shared_state(setup.net)
    start = ArrayRecord(initial)  # read-only for the strategy: one copy serves every run
    direction = canary_direction({k: v.shape for k, v in initial.items()}, keyed_seed(seed, STREAM_AUDIT))

    def client(msg, context):
        state, assignment = read_train_message(msg)
        scale = canary_norm * (assignment.clip_norm or 1.0)

        def crafted(user_ids):
            if canary[0] in user_ids:
                return {k: scale * u for k, u in direction.items()}
            return {k: torch.zeros_like(u) for k, u in direction.items()} if others == "silent" else None

        total, metrics = run_train_assignment(state, assignment, crafted=crafted)
        return train_reply(msg, total, metrics)

    grid = InProcessGrid(client, max(1, cfg.simulation.num_supernodes or 2))
    base_task = make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape, 0)

    def one_run(population: np.ndarray, sampling_key: int, noise_key: tuple[int, ...]) -> float:
        # fresh OS noise in every run; a seeded config makes the whole audit reproducible
        noise_seed = keyed_seed(cfg.run.seed, STREAM_AUDIT, _NOISE_KEYS, *noise_key) if cfg.run.seed >= 0 else None
        mechanism = make_mechanism(cfg, privacy, GaussianNoise(privacy.noise_multiplier * cfg.privacy.clip_norm,
                                                               noise_seed), slots)
        score = _Score(direction)
        task = base_task | {"training_key": keyed_seed(sampling_key, STREAM_TRAINING_KEY)}
        strategy = DPFedEmb(sampler=make_sampler(sampling_key, cfg.sampling, slots), user_ids=population, task=task,
                            mechanism=mechanism, ledger=PrivacyLedger(None, privacy.delta, privacy.accountant),
                            server_optimizer=ServerOptimizer(initial, cfg.server.lr, cfg.server.momentum),
                            eval_every=0, callbacks=[score])
        strategy.start(grid, start, num_rounds=rounds)
        return score.total

    scores: dict[bool, list[float]] = {True: [], False: []}
    attempts = 0
    total = plan.with_trials + plan.without_trials
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        with_canary = np.append(users, canary)
        for t in range(plan.with_trials):
            for attempt in count():
                key = keyed_seed(seed, STREAM_AUDIT, _SAMPLING_KEYS, t, 1, attempt)
                attempts += 1
                sampler = make_sampler(key, cfg.sampling, slots)
                if not plan.conditioned or _includes(sampler, canary, users, rounds, poisson=True):
                    break
            scores[True].append(one_run(with_canary, key, (t, 1)))
            if progress:
                progress(len(scores[True]), total)
        for t in range(plan.without_trials):
            scores[False].append(one_run(users, keyed_seed(seed, STREAM_AUDIT, _SAMPLING_KEYS, t, 0), (t, 0)))
            if progress:
                progress(plan.with_trials + len(scores[False]), total)
    finally:
        flwr_logger.setLevel(previous)
    design_inclusion = plan.inclusion if plan.conditioned else 1.0
    bound = epsilon_lower_bound(scores[True], scores[False], plan.delta, confidence, design_inclusion)
    observed = plan.with_trials / attempts if plan.conditioned and attempts else None
    return AuditResult(plan, bound, canary_norm, others, observed, scores[True], scores[False])
