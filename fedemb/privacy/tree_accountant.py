"""Privacy of DP-FTRL's tree aggregation without sampling amplification (Kairouz et al., 2021).

Each round's clipped sum is a leaf of a binary tree; every completed dyadic node gets its own
Gaussian noise N(0, σ²) and the noisy prefix sums are built from them. Everything released after t
rounds is a function of the noisy nodes that are complete by round t, so it is one Gaussian mechanism
whose squared sensitivity is the worst case, over the participation patterns a user may have, of
Σ_nodes (participations of the user inside the node)² times the per-participation sensitivity².

The worst case is found by a max-plus recursion over the tree. It relaxes the minimum separation
across the boundary of two sibling subtrees (it only caps how many participations fit in each
subtree), so it can only over-estimate the sensitivity: ε is never understated.

With restarts every `restart_every` rounds the trees form a forest over consecutive segments; the
user's participations are split among them by the same recursion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

NEG = float("-inf")


@dataclass(frozen=True)
class ParticipationLimits:
    """What the sampler guarantees: a user takes part at most `max_participations` times (0: no limit
    beyond the separation), and two participations are at least `min_separation` rounds apart."""

    min_separation: int = 1
    max_participations: int = 0

    def cap(self, rounds: int) -> int:
        """The most participations that fit in `rounds` consecutive rounds."""
        fit = -(-rounds // self.min_separation) if rounds > 0 else 0
        return min(fit, self.max_participations) if self.max_participations else fit


def _max_plus(a: list[float], b: list[float], cap: int) -> list[float]:
    out = [NEG] * (cap + 1)
    for i, x in enumerate(a):
        if x == NEG:
            continue
        for j, y in enumerate(b):
            if y != NEG and i + j <= cap:
                out[i + j] = max(out[i + j], x + y)
    return out


def _tree_profile(leaves: int, limits: ParticipationLimits) -> list[float]:
    """profile[p] = max Σ_nodes count² over p participations in a tree over `leaves` released rounds
    (a complete tree of the next power of two, of which only nodes ending by round `leaves` count)."""
    height = max(0, math.ceil(math.log2(leaves))) if leaves > 1 else 0

    @lru_cache(maxsize=None)
    def full(level: int) -> tuple[float, ...]:
        size = 1 << level
        cap = limits.cap(size)
        if level == 0:
            return tuple(float(p * p) for p in range(cap + 1))
        child = list(full(level - 1))
        merged = _max_plus(child, child, cap)
        return tuple(v + p * p if v != NEG else NEG for p, v in enumerate(merged))

    def partial(level: int, released: int) -> list[float]:
        """A subtree of 2^level leaves of which only the first `released` are released rounds."""
        size = 1 << level
        if released >= size:
            return list(full(level))
        if released <= 0:
            return [0.0]
        half = size // 2
        left = partial(level - 1, released)
        right = partial(level - 1, released - half)
        return _max_plus(left, right, limits.cap(min(released, size)))

    return partial(height, leaves)


@lru_cache(maxsize=4096)
def max_sensitivity_squared(rounds: int, limits: ParticipationLimits, restart_every: int = 0) -> float:
    """Worst-case Σ_nodes count² after `rounds` rounds (in units of the per-participation sensitivity²)."""
    if rounds <= 0:
        return 0.0
    segment = restart_every if restart_every > 0 else rounds
    total_cap = limits.cap(rounds)
    combined = [0.0]
    start = 0
    while start < rounds:
        length = min(segment, rounds - start)
        combined = _max_plus(combined, _tree_profile(length, limits), total_cap)
        start += length
    return max(v for v in combined if v != NEG)


def equivalent_noise_multiplier(noise_multiplier: float, rounds: int, limits: ParticipationLimits,
                                restart_every: int = 0) -> float:
    """The noise multiplier of the single Gaussian mechanism that the whole tree release is
    (z / sqrt(max Σ count²)); 0 without noise, inf before any round."""
    s2 = max_sensitivity_squared(rounds, limits, restart_every)
    if s2 == 0:
        return math.inf
    return noise_multiplier / math.sqrt(s2)


def prefix_node_count(t: int) -> int:
    """How many tree nodes make up the prefix sum of rounds 1..t (its noise variance in units of σ²)."""
    return bin(t).count("1")
