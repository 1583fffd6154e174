"""Gaussian noise for the aggregate, from a generator seeded by the OS's secure randomness by default."""

from __future__ import annotations

import secrets

import torch

from fedemb.privacy.clipping import Update
from fedemb.privacy.keyed_random import keyed_seed

STREAM_NOISE = 11


class GaussianNoise:
    def __init__(self, std: float, seed: int | None = None):
        self.std = std
        self.predictable = seed is not None
        self._generator = torch.Generator()
        self._generator.manual_seed(keyed_seed(seed, STREAM_NOISE) if seed is not None else secrets.randbits(63))

    def add(self, total: Update) -> Update:
        if self.std == 0:
            return {k: v.clone() for k, v in total.items()}
        return {k: v + self.std * torch.randn(v.shape, generator=self._generator, dtype=v.dtype)
                for k, v in total.items()}
