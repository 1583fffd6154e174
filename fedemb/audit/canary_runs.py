"""Many short runs of the real mechanism, half with a canary user and half without.

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
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedemb.audit.bounds import EpsilonBound, epsilon_lower_bound
from fedemb.config import Config
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


@dataclass
class AuditResult:
    claimed_epsilon: float
    delta: float
    bound: EpsilonBound
    trials: int  # per world
    rounds: int
    mechanism: str
    canary_norm: float
    with_scores: list[float] = field(repr=False)
    without_scores: list[float] = field(repr=False)

    @property
    def consistent(self) -> bool:
        """The audit found no more leakage than the accountant claims."""
        return self.bound.epsilon <= self.claimed_epsilon

    def to_json(self) -> dict:
        return {"claimed_epsilon": self.claimed_epsilon, "delta": self.delta,
                "epsilon_lower_bound": self.bound.epsilon, "confidence": self.bound.confidence,
                "threshold": self.bound.threshold, "tpr_lower": self.bound.tpr_lower,
                "fpr_upper": self.bound.fpr_upper, "evaluation_trials_per_world": self.bound.evaluation_trials,
                "trials_per_world": self.trials, "rounds": self.rounds, "mechanism": self.mechanism,
                "canary_norm_in_clip_norms": self.canary_norm, "consistent": self.consistent,
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


def run_audit(cfg: Config, trials: int = 200, rounds: int = 1, confidence: float = 0.95, canary_norm: float = 100.0,
              seed: int = 0, progress: Callable[[int, int], None] | None = None) -> AuditResult:
    from strategies.dp_fedemb import DPFedEmb
    from strategies.server_optimizer import ServerOptimizer

    cfg = copy.deepcopy(cfg)
    cfg.run.rounds, cfg.run.eval_every = rounds, 0
    setup = prepare_run(cfg)
    plan, slots = setup.privacy, setup.virtual_clients
    users = setup.splits.train.user_ids
    canary = int(users.max()) + 1
    initial = shared_state(setup.net)
    direction = canary_direction({k: v.shape for k, v in initial.items()}, keyed_seed(seed, STREAM_AUDIT))

    def client(msg, context):
        state, assignment = read_train_message(msg)
        scale = canary_norm * (assignment.clip_norm or 1.0)

        def crafted(user_ids):
            return {k: scale * u for k, u in direction.items()} if canary in user_ids else None

        total, metrics = run_train_assignment(state, assignment, crafted=crafted)
        return train_reply(msg, total, metrics)

    grid = InProcessGrid(client, max(1, cfg.simulation.num_supernodes or 2))
    scores: dict[bool, list[float]] = {True: [], False: []}
    claimed = plan.epsilon_after(rounds)
    name = ""
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        for world in (True, False):
            population = np.append(users, canary) if world else users
            for t in range(trials):
                trial_seed = keyed_seed(seed, STREAM_AUDIT, t, int(world))
                # fresh OS noise in every trial; a seeded config makes the whole audit reproducible
                noise_seed = keyed_seed(cfg.run.seed, STREAM_AUDIT, t, int(world), 1) if cfg.run.seed >= 0 else None
                noise = GaussianNoise(plan.noise_multiplier * cfg.privacy.clip_norm, noise_seed)
                mechanism = make_mechanism(cfg, plan, noise, slots)
                name = mechanism.name
                score = _Score(direction)
                task = make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape,
                                 keyed_seed(trial_seed, STREAM_TRAINING_KEY))
                ledger = PrivacyLedger(None, plan.delta, plan.accountant)
                strategy = DPFedEmb(sampler=make_sampler(trial_seed, cfg.sampling, slots), user_ids=population,
                                    task=task, mechanism=mechanism,
                                    server_optimizer=ServerOptimizer(initial, cfg.server.lr, cfg.server.momentum),
                                    ledger=ledger, eval_every=0, callbacks=[score])
                strategy.start(grid, ArrayRecord(initial), num_rounds=rounds)
                claimed = ledger.epsilon
                scores[world].append(score.total)
                if progress:
                    progress(len(scores[True]) + len(scores[False]), 2 * trials)
    finally:
        flwr_logger.setLevel(previous)
    bound = epsilon_lower_bound(scores[True], scores[False], plan.delta, confidence)
    return AuditResult(claimed, plan.delta, bound, trials, rounds, name, canary_norm, scores[True], scores[False])
