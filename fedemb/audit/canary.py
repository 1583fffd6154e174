"""The audit's canary: one more user of the population, its crafted update, and whether a sampler picks it.

Whenever the canary is sampled, the virtual client it joins sends a fixed random unit direction u
(over all shared tensors) times a multiple of the clip norm instead of training (simulations.canary_runs).
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLING_KEYS, NOISE_KEYS, INCLUSION_KEYS = 0, 1, 2  # sub-streams of STREAM_AUDIT (fedemb.privacy.streams)


def canary_user(users: np.ndarray) -> np.ndarray:
    """The canary's id (as a one-element array): one that no user of the population has."""
    return np.array([int(users.max()) + 1])


def canary_direction(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    norm = torch.sqrt(sum((v ** 2).sum() for v in raw.values()))
    return {k: v / norm for k, v in raw.items()}


def includes_canary(sampler, canary: np.ndarray, users: np.ndarray, rounds: int) -> bool:
    """Whether the sampler picks the canary in some round, asked of the whole population with the canary:
    the cohort is drawn among the population's positions, so the canary alone would be another draw."""
    population = np.append(users, canary)
    return any(canary[0] in sampler.sample(r, population) for r in range(1, rounds + 1))
