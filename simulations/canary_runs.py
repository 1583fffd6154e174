"""Many short runs of the real mechanism, with a canary user and without it (fedemb.audit.canary).

Whenever the canary is sampled, the virtual client it joins sends a crafted update instead of
training: a fixed random unit direction u (over all shared tensors) times `canary_norm` clip norms
(100 by default), which the node's clipping brings back to norm C; if clipping were missing anywhere,
the canary would stand out by a factor of 100. This is the worst case the sensitivity argument
allows: with k > 1 the canary's virtual client could send anything in the C-ball. Everything else is
the run's own code: sampling, grouping, local training of the other virtual clients, clipping, reply
checks, the mechanism's noise, the fixed denominator. Messages go through an in-process Grid instead
of Ray, so thousands of short runs are affordable.

The score of a run is Σ over its rounds of <released mean update, u>: what an adversary who knows u
and sees the released models would compute. Which runs carry the canary, and how their scores become
a bound against the claim: fedemb.audit.plan and fedemb.audit.bounds.

`others = "silent"`: the other virtual clients send zero updates instead of training. DP must hold
for every data set, including one whose other users' updates are zero, so this is still an audit of
the claim (of sampling, clipping, checks, noise and denominator, not of local training), with a
sharper separation, at a fraction of the cost.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from itertools import count

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedemb.audit.bounds import epsilon_lower_bound
from fedemb.audit.canary import (NOISE_KEYS, SAMPLING_KEYS, canary_direction, canary_user,
                                 includes_canary)
from fedemb.audit.plan import MAX_TRIALS, plan_audit
from fedemb.audit.verdict import AuditResult
from fedemb.config import Config
from fedemb.errors import FedembError
from fedemb.models.embedding_net import shared_state, update_state
from fedemb.monitoring.callback import RoundCallback
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import make_sampler
from fedemb.privacy.streams import STREAM_AUDIT, STREAM_TRAINING_KEY
from fedemb.protocol import read_train_message, train_reply
from fedemb.run_setup import prepare_run
from fedemb.training.client_task import make_task, run_train_assignment
from simulations.inprocess import InProcessGrid
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import make_server_optimizer

OTHERS = ("trained", "silent")


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


def run_audit(cfg: Config, trials: int | str = 200, rounds: int = 1, confidence: float = 0.95,
              canary_norm: float = 100.0, seed: int = 0, others: str = "trained", max_trials: int = MAX_TRIALS,
              measure: bool = False, progress: Callable[[int, int], None] | None = None) -> AuditResult:
    """Plan the audit, and run it unless its trials could not contradict the claim (then the verdict is
    inconclusive without a run; `measure` runs them anyway, for the leakage they measure)."""
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
    canary = canary_user(users)
    initial = shared_state(setup.net)
    start = ArrayRecord(initial)  # read-only for the strategy: one copy serves every run
    direction = canary_direction({k: v.shape for k, v in update_state(setup.net).items()}, keyed_seed(seed, STREAM_AUDIT))

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
        noise_seed = keyed_seed(cfg.run.seed, STREAM_AUDIT, NOISE_KEYS, *noise_key) if cfg.run.seed >= 0 else None
        mechanism = make_mechanism(cfg, privacy, GaussianNoise(privacy.noise_multiplier * cfg.privacy.clip_norm,
                                                               noise_seed), slots)
        score = _Score(direction)
        task = base_task.model_copy(update={"training_key": keyed_seed(sampling_key, STREAM_TRAINING_KEY)})
        strategy = DPFedEmb(sampler=make_sampler(sampling_key, cfg.sampling, slots), user_ids=population, task=task,
                            mechanism=mechanism, ledger=PrivacyLedger(None, privacy.delta, privacy.accountant),
                            server_optimizer=make_server_optimizer(cfg, initial, mechanism, slots),
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
                key = keyed_seed(seed, STREAM_AUDIT, SAMPLING_KEYS, t, 1, attempt)
                attempts += 1
                sampler = make_sampler(key, cfg.sampling, slots)
                if not plan.conditioned or includes_canary(sampler, canary, users, rounds):
                    break
            scores[True].append(one_run(with_canary, key, (t, 1)))
            if progress:
                progress(len(scores[True]), total)
        for t in range(plan.without_trials):
            scores[False].append(one_run(users, keyed_seed(seed, STREAM_AUDIT, SAMPLING_KEYS, t, 0), (t, 0)))
            if progress:
                progress(plan.with_trials + len(scores[False]), total)
    finally:
        flwr_logger.setLevel(previous)
    design_inclusion = plan.inclusion if plan.conditioned else 1.0
    bound = epsilon_lower_bound(scores[True], scores[False], plan.delta, confidence, design_inclusion)
    observed = plan.with_trials / attempts if plan.conditioned and attempts else None
    return AuditResult(plan, bound, canary_norm, others, observed, scores[True], scores[False])
