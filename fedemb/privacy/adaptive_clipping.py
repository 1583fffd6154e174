"""Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", 2021).

Each round every virtual client also reports whether its update was within the current clip norm C.
The server releases the count of those bits, centred (b − ½ each) and noised with its own std σ_b,
estimates the unclipped fraction b̃ = noisy / M + ½, and moves C geometrically toward the target
quantile γ:  C ← C · exp(−η (b̃ − γ)).

The count is a second Gaussian query on the same users in the same round. The two together are one
Gaussian mechanism whose squared sensitivity is (S_Δ/σ_Δ)² + (S_b/σ_b)², so to keep the accounted
noise multiplier z the update noise is inflated:  σ_Δ = S_Δ / sqrt(z⁻² − (S_b/σ_b)²)
(fedemb.privacy.mechanisms.joint_update_noise_multiplier).

C decides which updates are clipped; it should not also decide how far the server moves. Left alone,
a C that grows to the median update norm (4-7x the fixed clip norm on MNIST, where nearly every update
is clipped) multiplies the server step and its noise by as much, the steps grow the model, the model's
updates grow, and C follows them (docs/results.md, "Training utility"). So the server step is scaled by
C₀ / C (C₀: privacy.clip_norm, where C starts): server.lr keeps the meaning it has with a fixed C₀.
C is released, so the scaling is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdaptiveClipping:
    clip_norm: float  # C for the coming round
    target_quantile: float  # γ: the fraction of updates that should be unclipped
    learning_rate: float  # η
    count_std: float  # σ_b, on the centred count
    scale_server_step: bool = True  # multiply the server step by C₀ / C

    def step_scale(self, initial_clip_norm: float) -> float:
        """The factor of this round's server step, from the C the round clipped to."""
        return initial_clip_norm / self.clip_norm if self.scale_server_step else 1.0

    def update(self, noisy_centred_count: float, virtual_clients: int) -> float:
        """Move C after a round (M = `virtual_clients`); returns the estimated unclipped fraction."""
        unclipped = noisy_centred_count / virtual_clients + 0.5
        self.clip_norm *= math.exp(-self.learning_rate * (unclipped - self.target_quantile))
        return unclipped

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = float(state["clip_norm"])
