"""Which users take part in a round, and which virtual client each one joins.

Poisson sampling: each user takes part independently with probability q (what the accountant assumes).
It is drawn as the same distribution in two steps that touch only the cohort: the cohort size
n ~ Binomial(N, q) (inverse CDF of one keyed uniform), then a uniform n-subset of the N positions of
the user-id array (the first n distinct values of a sequence of keyed uniform draws over [0, N)).
Given n, Poisson sampling makes every n-subset equally likely (each has probability q^n (1-q)^(N-n)),
so the two steps give every user set exactly its Poisson probability: O(n) time and memory per round,
whatever N is. Fixed-size sampling: the same uniform subset with n = round(q·N).
Limited participation (for DP-FTRL): each round the m = round(q·N) users with the smallest keyed
draws among those still allowed to take part: at most `max_participations` times in the run, and at
least `min_separation` rounds after their last participation. The tree accountant is told exactly
these limits, and this sampler is what enforces them. It stays O(N) per round: its state is per user
(who took part when), and who is eligible depends on every user's history.
Grouping: each sampled user independently picks one of M virtual-client slots from its own keyed draw
of (round, user id); with k = 1 every sampled user is its own virtual client. Either way, given the
cohort, one user's presence changes the virtual client it joins only.
Every draw is the keyed PRF of (server secret, round, counters, stream) (fedemb.privacy.keyed_random):
without the secret nobody can tell who else was drawn, which is what amplification by sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedemb.privacy.keyed_random import Secret, keyed_hash, keyed_uniform
from fedemb.privacy.streams import STREAM_COHORT, STREAM_COHORT_SIZE, STREAM_GROUPING, STREAM_SAMPLING

_TWO_64 = 1 << 64


@dataclass(frozen=True)
class VirtualClient:
    index: int  # slot in 0..M-1 (with k = 1: position among the sampled users; server-side only on devices)
    user_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    round: int
    sampled_users: np.ndarray
    virtual_clients: list[VirtualClient]


class UserSampler:
    def __init__(self, seed: Secret, sampling_rate: float, users_per_client: int, virtual_clients: int,
                 method: str = "poisson"):
        if virtual_clients < 1:
            raise ValueError("virtual_clients must be >= 1")
        self.seed = seed
        self.rate = sampling_rate
        self.users_per_client = users_per_client
        self.virtual_clients = virtual_clients
        self.method = method

    def cohort_size(self, round_number: int, population: int) -> int:
        """How many of the `population` users take part: Binomial(N, q) for Poisson, round(q·N) for fixed-size."""
        if self.method == "poisson":
            return poisson_cohort_size(self.seed, round_number, population, self.rate)
        return int(round(self.rate * population))

    def sample(self, round_number: int, user_ids: np.ndarray) -> np.ndarray:
        """The round's users, sorted: O(cohort) work, the user ids are only indexed (an array, or a
        population's lazy UserRange: fedemb.data.population)."""
        user_ids = indexable_ids(user_ids)
        size = self.cohort_size(round_number, len(user_ids))
        return np.sort(np.asarray(user_ids[uniform_subset(self.seed, round_number, len(user_ids), size)],
                                  dtype=np.int64))

    def group(self, round_number: int, sampled: np.ndarray) -> list[VirtualClient]:
        sampled = np.sort(np.asarray(sampled, dtype=np.int64))
        if self.users_per_client == 1:
            return [VirtualClient(i, (int(u),)) for i, u in enumerate(sampled)]
        draws = keyed_uniform(self.seed, round_number, sampled, STREAM_GROUPING)
        slots = np.minimum((draws * self.virtual_clients).astype(np.int64), self.virtual_clients - 1)
        order = np.argsort(slots, kind="stable")  # members of a slot stay in id order
        slots, members = slots[order], sampled[order]
        starts = np.flatnonzero(np.diff(slots, prepend=-1))
        return [VirtualClient(int(slots[start]), tuple(int(u) for u in users))
                for start, users in zip(starts, np.split(members, starts[1:]))]

    def plan(self, round_number: int, user_ids: np.ndarray) -> RoundPlan:
        sampled = self.sample(round_number, user_ids)
        return RoundPlan(round_number, sampled, self.group(round_number, sampled))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LimitedParticipationSampler(UserSampler):
    """Fixed-size cohorts among the users whose participation limits allow them this round.
    Stateful: `plan` must be called once per round, in order (the state is checkpointed).
    O(N) per round, unlike the other methods: eligibility depends on every user's own history."""

    def __init__(self, seed: Secret, sampling_rate: float, users_per_client: int, virtual_clients: int,
                 min_separation: int = 1, max_participations: int = 0):
        super().__init__(seed, sampling_rate, users_per_client, virtual_clients, "limited")
        self.min_separation = min_separation
        self.max_participations = max_participations
        self.last_round: dict[int, int] = {}
        self.participations: dict[int, int] = {}

    def eligible(self, round_number: int, user_ids: np.ndarray) -> np.ndarray:
        last = np.array([self.last_round.get(int(u), -(1 << 40)) for u in user_ids], dtype=np.int64)
        count = np.array([self.participations.get(int(u), 0) for u in user_ids], dtype=np.int64)
        ok = round_number - last >= self.min_separation
        if self.max_participations:
            ok &= count < self.max_participations
        return ok

    def sample(self, round_number: int, user_ids: np.ndarray) -> np.ndarray:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        size = int(round(self.rate * len(user_ids)))
        candidates = user_ids[self.eligible(round_number, user_ids)]
        order = np.argsort(keyed_hash(self.seed, round_number, candidates, STREAM_SAMPLING), kind="stable")
        chosen = np.sort(candidates[order[:size]])
        for u in chosen:
            self.last_round[int(u)] = round_number
            self.participations[int(u)] = self.participations.get(int(u), 0) + 1
        return chosen

    def state_dict(self) -> dict:
        users = sorted(self.participations)
        return {"users": users, "last_round": [self.last_round[u] for u in users],
                "participations": [self.participations[u] for u in users]}

    def load_state_dict(self, state: dict) -> None:
        users = [int(u) for u in state["users"]]
        self.last_round = dict(zip(users, (int(r) for r in state["last_round"])))
        self.participations = dict(zip(users, (int(c) for c in state["participations"])))


def indexable_ids(user_ids):
    """User ids as something indexed by positions: a lazy id range (fedemb.data.population.UserRange)
    stays lazy, so a round never lists a population; the rest becomes an int64 array."""
    return user_ids if getattr(user_ids, "lazy_ids", False) else np.asarray(user_ids, dtype=np.int64)


def make_sampler(seed: Secret, sampling_cfg, virtual_clients: int) -> UserSampler:
    s = sampling_cfg
    if s.method == "limited":
        return LimitedParticipationSampler(seed, s.rate, s.users_per_client, virtual_clients, s.min_separation,
                                           s.max_participations)
    return UserSampler(seed, s.rate, s.users_per_client, virtual_clients, s.method)


def poisson_cohort_size(secret: Secret, round_number: int, population: int, rate: float) -> int:
    """n ~ Binomial(N, q): the Binomial quantile of one keyed uniform U in (0, 1] (inverse-transform
    sampling: P(n <= k) = P(U <= F(k)) = F(k), up to U's 2^-53 resolution)."""
    if population == 0 or rate <= 0:
        return 0
    if rate >= 1:
        return population
    from scipy.stats import binom  # server-only (fedemb[all]); a device never samples

    u = 1.0 - float(keyed_uniform(secret, round_number, STREAM_COHORT_SIZE))
    return int(binom.ppf(u, population, rate))


def uniform_subset(secret: Secret, round_number: int, population: int, size: int) -> np.ndarray:
    """`size` distinct positions in [0, population), every subset of that size equally likely, sorted.

    The first `size` distinct values of a sequence of independent uniform draws: a permutation of
    [0, population) maps the sequence to one just as likely and its first distinct values to their
    image, so every subset is equally likely. Each draw is a keyed 64-bit word below the largest
    multiple of `population` (the others are skipped), modulo `population`: exactly uniform. O(size)
    time and memory when size <= population / 2; above that the complement is drawn, and O(population)
    is then O(size)."""
    if not 0 <= size <= population:
        raise ValueError(f"cannot draw {size} of {population} positions")
    if 2 * size > population:
        keep = np.ones(population, dtype=bool)
        keep[uniform_subset(secret, round_number, population, population - size)] = False
        return np.flatnonzero(keep)
    limit = _TWO_64 - _TWO_64 % population if size else _TWO_64
    picked = np.empty(0, dtype=np.int64)
    drawn = 0
    while len(picked) < size:
        missing = size - len(picked)  # a draw is new with probability (N - picked) / N
        batch = missing + missing * len(picked) // (population - len(picked)) + 16
        words = keyed_hash(secret, round_number, np.arange(drawn, drawn + batch, dtype=np.uint64), STREAM_COHORT)
        drawn += batch
        if limit < _TWO_64:
            words = words[words < np.uint64(limit)]
        picked = np.concatenate([picked, (words % np.uint64(population)).astype(np.int64)])
        _, first = np.unique(picked, return_index=True)
        picked = picked[np.sort(first)]  # the distinct values, in the order they were first drawn
    return np.sort(picked[:size])


def virtual_client_slots(num_users: int, sampling_rate: float, users_per_client: int) -> int:
    """M = expected sampled users / k, at least 1. Fixed at the start of a run, never from a round's data."""
    return max(1, int(round(num_users * sampling_rate / users_per_client)))
