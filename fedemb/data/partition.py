"""Synthetic users for datasets without user ids."""

from __future__ import annotations

import numpy as np


def partition_iid(labels: np.ndarray, num_users: int, rng: np.random.Generator) -> np.ndarray:
    users = np.empty(len(labels), dtype=np.int64)
    users[rng.permutation(len(labels))] = np.arange(len(labels)) % num_users
    return users


def partition_shards(labels: np.ndarray, num_users: int, shards_per_user: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Sort by label, cut into num_users * shards_per_user shards, give each user shards_per_user."""
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, num_users * shards_per_user)
    owner = rng.permutation(len(shards)) % num_users
    users = np.empty(len(labels), dtype=np.int64)
    for shard, u in zip(shards, owner):
        users[shard] = u
    return users


def partition_dirichlet(labels: np.ndarray, num_users: int, alpha: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Label skew: each class is split among users with proportions drawn from Dir(alpha).
    Every user ends with at least one example."""
    users = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_users, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for u, part in enumerate(np.split(idx, cuts)):
            users[part] = u
    counts = np.bincount(users, minlength=num_users)
    for u in np.flatnonzero(counts == 0):  # give empty users one example from the largest user
        donor = int(np.argmax(counts))
        moved = np.flatnonzero(users == donor)[0]
        users[moved] = u
        counts[donor] -= 1
        counts[u] += 1
    return users


def synthetic_users(labels: np.ndarray, kind: str, num_users: int, alpha: float, shards_per_user: int,
                    seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return partition_iid(labels, num_users, rng)
    if kind == "shards":
        return partition_shards(labels, num_users, shards_per_user, rng)
    return partition_dirichlet(labels, num_users, alpha, rng)
