"""User-level (ε, δ) of a run: Opacus accountants over one sampled-Gaussian step per round."""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedemb.errors import ConfigError
from fedemb.privacy.sensitivity import (accounting_noise_multiplier, noise_multiplier_for,
                                        sensitivity_in_clip_norms)


def default_delta(population: int) -> float:
    return 1.0 / population**1.1


def epsilon_for(accountant: str, sampling_rate: float, accounting_z: float, rounds: int, delta: float) -> float:
    """ε after `rounds` sampled-Gaussian steps; inf without noise; 0 for no step."""
    if rounds <= 0:
        return 0.0
    if accounting_z <= 0:
        return math.inf
    acc = create_accountant(accountant)
    acc.history = [(accounting_z, sampling_rate, rounds)]
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=0.01))
    return float(acc.get_epsilon(delta=delta))


def calibrate_accounting_z(accountant: str, target_epsilon: float, delta: float, sampling_rate: float,
                           rounds: int) -> float:
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sampling_rate, steps=rounds, accountant=accountant,
                                          epsilon_tolerance=0.01))
    except ValueError as exc:
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon} cannot be reached: {exc}") from None


@dataclass
class PrivacyPlan:
    """What the run promises: noise (z = std / C), what the accountant is told, and the budget."""

    accountant: str
    sampling_rate: float  # q as the accountant sees it (1.0 without amplification)
    noise_multiplier: float  # z: noise std = z * C
    accounting_noise_multiplier: float  # z * C / sensitivity
    sensitivity: float  # in units of C
    delta: float
    target_epsilon: float  # 0: no budget

    def epsilon_after(self, rounds: int) -> float:
        return epsilon_for(self.accountant, self.sampling_rate, self.accounting_noise_multiplier, rounds,
                           self.delta)

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds in all stay within the target (always, without a target)."""
        return self.target_epsilon <= 0 or self.epsilon_after(rounds) <= self.target_epsilon * (1 + 1e-9)


def make_privacy_plan(cfg, population: int) -> PrivacyPlan:
    """From a validated Config and the number of training users N.

    With `privacy.target_epsilon` > 0 and `privacy.calibrate_noise`, z is calibrated so that
    `run.rounds` rounds spend the target; without calibration the configured z runs until the target
    would be exceeded. Either way no round past the target is run.
    """
    p, s = cfg.privacy, cfg.sampling
    delta = p.delta or default_delta(population)
    q = s.rate if s.method == "poisson" else 1.0  # fixed-size: no amplification by sampling
    sens = sensitivity_in_clip_norms(s.users_per_client, s.method)
    if not p.enabled:
        return PrivacyPlan(p.accountant, q, 0.0, 0.0, sens, delta, 0.0)
    if p.target_epsilon > 0 and p.calibrate_noise:
        acc_z = calibrate_accounting_z(p.accountant, p.target_epsilon, delta, q, cfg.run.rounds)
        z = noise_multiplier_for(acc_z, s.users_per_client, s.method)
    else:
        z = p.noise_multiplier
        acc_z = accounting_noise_multiplier(z, s.users_per_client, s.method)
    return PrivacyPlan(p.accountant, q, z, acc_z, sens, delta, p.target_epsilon)
