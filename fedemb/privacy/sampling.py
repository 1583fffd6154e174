"""Which users take part in a round, and which virtual client each one joins.

Poisson sampling: each user takes part independently with probability q (what the accountant assumes).
Fixed-size sampling: the m users with the smallest keyed draws (without replacement).
Limited participation (for DP-FTRL): each round the m = round(q·N) users with the smallest keyed
draws among those still allowed to take part: at most `max_participations` times in the run, and at
least `min_separation` rounds after their last participation. The tree accountant is told exactly
these limits, and this sampler is what enforces them.
Grouping: each sampled user independently picks one of M virtual-client slots; with k = 1 every
sampled user is its own virtual client. Either way one user's presence changes one virtual client only.
Every draw is the keyed PRF of (server secret, round, user id, stream) (fedemb.privacy.keyed_random):
without the secret nobody can tell who else was drawn, which is what amplification by sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedemb.privacy.keyed_random import Secret, keyed_hash, keyed_uniform
from fedemb.privacy.streams import STREAM_GROUPING, STREAM_SAMPLING


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

    def sample(self, round_number: int, user_ids: np.ndarray) -> np.ndarray:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if self.method == "poisson":
            draws = keyed_uniform(self.seed, round_number, user_ids, STREAM_SAMPLING)
            return np.sort(user_ids[draws < self.rate])
        size = int(round(self.rate * len(user_ids)))
        order = np.argsort(keyed_hash(self.seed, round_number, user_ids, STREAM_SAMPLING), kind="stable")
        return np.sort(user_ids[order[:size]])

    def group(self, round_number: int, sampled: np.ndarray) -> list[VirtualClient]:
        sampled = np.sort(np.asarray(sampled, dtype=np.int64))
        if self.users_per_client == 1:
            return [VirtualClient(i, (int(u),)) for i, u in enumerate(sampled)]
        draws = keyed_uniform(self.seed, round_number, sampled, STREAM_GROUPING)
        slots = np.minimum((draws * self.virtual_clients).astype(np.int64), self.virtual_clients - 1)
        return [VirtualClient(int(s), tuple(int(u) for u in sampled[slots == s]))
                for s in np.unique(slots)]

    def plan(self, round_number: int, user_ids: np.ndarray) -> RoundPlan:
        sampled = self.sample(round_number, user_ids)
        return RoundPlan(round_number, sampled, self.group(round_number, sampled))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LimitedParticipationSampler(UserSampler):
    """Fixed-size cohorts among the users whose participation limits allow them this round.
    Stateful: `plan` must be called once per round, in order (the state is checkpointed)."""

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


def make_sampler(seed: Secret, sampling_cfg, virtual_clients: int) -> UserSampler:
    s = sampling_cfg
    if s.method == "limited":
        return LimitedParticipationSampler(seed, s.rate, s.users_per_client, virtual_clients, s.min_separation,
                                           s.max_participations)
    return UserSampler(seed, s.rate, s.users_per_client, virtual_clients, s.method)


def virtual_client_slots(num_users: int, sampling_rate: float, users_per_client: int) -> int:
    """M = expected sampled users / k, at least 1. Fixed at the start of a run, never from a round's data."""
    return max(1, int(round(num_users * sampling_rate / users_per_client)))
