"""Which users take part in a round, and which virtual client each one joins.

Poisson sampling: each user takes part independently with probability q (what the accountant assumes).
Fixed-size sampling: the m users with the smallest keyed draws (without replacement).
Grouping: each sampled user independently picks one of M virtual-client slots; with k = 1 every
sampled user is its own virtual client. Either way one user's presence changes one virtual client only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedemb.privacy.keyed_random import STREAM_GROUPING, STREAM_SAMPLING, keyed_hash, keyed_uniform


@dataclass(frozen=True)
class VirtualClient:
    index: int  # slot in 0..M-1 (with k = 1: position among the sampled users)
    user_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    round: int
    sampled_users: np.ndarray
    virtual_clients: list[VirtualClient]


class UserSampler:
    def __init__(self, seed: int, sampling_rate: float, users_per_client: int, virtual_clients: int,
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


def virtual_client_slots(num_users: int, sampling_rate: float, users_per_client: int) -> int:
    """M = expected sampled users / k, at least 1. Fixed at the start of a run, never from a round's data."""
    return max(1, int(round(num_users * sampling_rate / users_per_client)))
