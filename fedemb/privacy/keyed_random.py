"""Counter-based randomness: every draw is a pure function of its key.

A user's sampling and grouping draws are keyed by (seed, round, user id, stream), so no user's draws
depend on which other users exist. That is what keeps the sensitivity argument of the grouping: adding
or removing one user cannot move anybody else.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

STREAM_SAMPLING = 1
STREAM_GROUPING = 2
STREAM_FAULTS = 3
STREAM_TRAINING = 4
STREAM_HEAD_ANCHORS = 5


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 with good avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def keyed_hash(*keys) -> np.ndarray:
    """64-bit hash of a tuple of integer keys; array keys broadcast."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x243F6A8885A308D3)
        for k in keys:
            k = np.asarray(k).astype(np.uint64)
            h = _mix(h ^ (k + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
        return np.asarray(h, dtype=np.uint64)


def keyed_uniform(*keys) -> np.ndarray:
    """Uniform draws in [0, 1) with 53 bits, one per broadcast key."""
    return (keyed_hash(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keyed_seed(*keys) -> int:
    """A 63-bit integer seed for torch/numpy generators, from integer keys."""
    return int(keyed_hash(*keys)) & ((1 << 63) - 1)
