"""Gaussian noise for the aggregate, from a generator seeded by the OS's secure randomness by default.

A seeded generator (run.seed) makes runs reproducible and its noise predictable; only then is its
state saved in checkpoints. An unseeded generator is never saved or restored: a resumed run draws
fresh noise, because reusing noise on a re-computed aggregate would reveal the difference.
"""

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

    def sample(self, shapes: dict[str, torch.Size], std: float) -> Update:
        return {k: std * torch.randn(shape, generator=self._generator, dtype=torch.float32)
                for k, shape in shapes.items()}

    def add(self, total: Update, std: float | None = None) -> Update:
        std = self.std if std is None else std
        if std == 0:
            return {k: v.clone() for k, v in total.items()}
        noise = self.sample({k: v.shape for k, v in total.items()}, std)
        return {k: v + noise[k].to(v.dtype) for k, v in total.items()}

    def draw_scalar(self, std: float) -> float:
        return float(std * torch.randn((), generator=self._generator, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()} if self.predictable else {}

    def load_state_dict(self, state: dict) -> None:
        if self.predictable and "generator" in state:
            self._generator.set_state(state["generator"])
