"""One privacy budget for a synthesis stage, split over its Gaussian releases.

Gaussian mechanisms with noise multipliers z_i (std / sensitivity) compose, under RDP and exactly under
Gaussian DP, like one Gaussian mechanism with 1/z² = Σ 1/z_i². So the stage calibrates one z for its
(ε, δ) with Opacus (`get_noise_multiplier`, q = 1, one step) and gives release i the share ρ_i of 1/z²:
z_i = z / √ρ_i, with Σ ρ_i = 1. The ledger then composes the releases back to the stage's ε.
"""

from __future__ import annotations

import math

from opacus.accountants.utils import get_noise_multiplier

from fedemb.errors import ConfigError
from fedemb.privacy.accountant import opacus_accountant


def stage_noise_multiplier(epsilon: float, delta: float, accountant: str) -> float:
    if not epsilon > 0:
        raise ConfigError(f"the synthesis epsilon must be > 0, got {epsilon}")
    if math.isinf(epsilon):
        return 0.0
    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                          accountant=opacus_accountant(accountant), epsilon_tolerance=0.005))
    except ValueError as exc:
        raise ConfigError(f"synthesis epsilon {epsilon} cannot be reached at delta {delta:.3g}: {exc}") from None


def split_noise_multiplier(z: float, shares: dict[str, float]) -> dict[str, float]:
    """z_i = z / √(ρ_i / Σρ) for every release with a positive share."""
    total = sum(shares.values())
    if total <= 0 or any(s < 0 for s in shares.values()):
        raise ConfigError(f"budget shares must be >= 0 with a positive sum, got {shares}")
    return {name: z / math.sqrt(share / total) for name, share in shares.items() if share > 0}
