"""Tree-aggregation noise for DP-FTRL: the noise of the round-to-round difference of noisy prefix sums.

Round t's clipped sum x_t is leaf t of a binary tree (rounds count from 1 within a tree). Every
dyadic node [j·2^l + 1, (j+1)·2^l] carries its own noise vector N(0, σ²), drawn once, when the node
completes. The noisy prefix sum of rounds 1..t is Σ x + the noise of the nodes that decompose [1, t]
(one per set bit of t). What the server optimizer receives is the difference of consecutive noisy
prefix sums, x_t + noise(t) − noise(t−1): the same model trajectory as feeding the prefix sums to
FTRL, but usable by any first-order server optimizer (SGD with momentum, as in the reference).
Only the nodes of the current decomposition are kept: at most log2(t) + 1 vectors.
"""

from __future__ import annotations

import torch

from fedemb.privacy.clipping import Update
from fedemb.privacy.noise import GaussianNoise


class TreeNoise:
    def __init__(self, std: float, noise: GaussianNoise, restart_every: int = 0):
        self.std = std
        self.noise = noise
        self.restart_every = restart_every
        self.step = 0  # rounds released in the current tree
        self.nodes: dict[tuple[int, int], Update] = {}  # (level, index) -> noise
        self.previous: Update | None = None  # the noise of the previous prefix sum

    def residual(self, total: Update) -> Update:
        """x_t + noise(t) − noise(t−1) for this round's clipped sum x_t."""
        if self.restart_every and self.step == self.restart_every:
            self.step, self.nodes, self.previous = 0, {}, None
        self.step += 1
        t = self.step
        new_level = (t & -t).bit_length() - 1  # the node completed by leaf t
        index = (t >> new_level) - 1
        self.nodes = {key: v for key, v in self.nodes.items() if key[0] > new_level}
        self.nodes[(new_level, index)] = self.noise.sample({k: v.shape for k, v in total.items()}, self.std)
        current = {k: sum(node[k] for node in self.nodes.values()) for k in total}
        previous = self.previous or {k: torch.zeros_like(v) for k, v in total.items()}
        self.previous = current
        return {k: total[k] + current[k] - previous[k] for k in total}

    def prefix_noise(self) -> Update | None:
        return self.previous

    def state_dict(self) -> dict:
        return {"step": self.step, "nodes": {f"{l},{i}": v for (l, i), v in self.nodes.items()},
                "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nodes = {tuple(int(x) for x in key.split(",")): v for key, v in state["nodes"].items()}
        self.previous = state["previous"]
