"""User-level (ε, δ) of a run before it starts: what the planned mechanism will spend.

- Sampled Gaussian (default): Opacus accountants (RDP or PRV) over one sampled-Gaussian step per round;
  RDP with its orders extended past Opacus's defaults where the best order is the largest
  (fedemb.privacy.rdp_accountant), for ε and for calibrating z alike.
- Tree aggregation (DP-FTRL): no amplification; the tree so far is one Gaussian mechanism
  (fedemb.privacy.tree_accountant), converted with the same Opacus accountant.

The run itself spends what its ledger records (fedemb.privacy.ledger); for the same mechanism the two
agree, which the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedemb.errors import ConfigError
from fedemb.privacy import rdp_accountant
from fedemb.privacy.sensitivity import (accounting_noise_multiplier, noise_multiplier_for,
                                        sensitivity_in_clip_norms)
from fedemb.privacy.tree_accountant import ParticipationLimits, equivalent_noise_multiplier


def default_delta(population: int) -> float:
    return 1.0 / population**1.1


# a config's accountant -> the Opacus accountant that computes it: RDP with orders extended past the
# defaults when the best order is the largest (fedemb.privacy.rdp_accountant)
OPACUS_ACCOUNTANTS = {"rdp": rdp_accountant.MECHANISM}


def opacus_accountant(accountant: str) -> str:
    """The name in Opacus's registry of the accountant a config names (`create_accountant`,
    `get_noise_multiplier`, `PrivacyEngine`), so that calibration and ε use the same orders."""
    return OPACUS_ACCOUNTANTS.get(accountant, accountant)


def composed_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a composition of sampled-Gaussian mechanisms [(z, q, steps), ...], as the Opacus accountant
    computes it. For RDP the per-step curves are cached (Opacus's compute_rdp is linear in steps), so
    asking after every round costs nothing."""
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    acc = create_accountant(opacus_accountant(accountant))
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))  # eps_error: PRV's precision; RDP ignores it


def epsilon_for(accountant: str, sampling_rate: float, accounting_z: float, rounds: int, delta: float) -> float:
    """ε after `rounds` sampled-Gaussian steps; inf without noise; 0 for no step."""
    if rounds <= 0:
        return 0.0
    return composed_epsilon(accountant, [(accounting_z, sampling_rate, rounds)], delta)


def tree_epsilon_for(accountant: str, accounting_z: float, rounds: int, delta: float, limits: ParticipationLimits,
                     restart_every: int = 0) -> float:
    if rounds <= 0:
        return 0.0
    if accounting_z <= 0:
        return math.inf
    return epsilon_for(accountant, 1.0, equivalent_noise_multiplier(accounting_z, rounds, limits, restart_every),
                       1, delta)


def calibrate_accounting_z(accountant: str, target_epsilon: float, delta: float, sampling_rate: float,
                           rounds: int) -> float:
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sampling_rate, steps=rounds,
                                          accountant=opacus_accountant(accountant),
                                          epsilon_tolerance=0.01))
    except ValueError as exc:
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon} cannot be reached: {exc}") from None


def calibrate_tree_z(accountant: str, target_epsilon: float, delta: float, rounds: int,
                     limits: ParticipationLimits, restart_every: int = 0) -> float:
    """The smallest z (to 1%) whose tree release over `rounds` rounds stays within the target."""
    def eps(z: float) -> float:
        return tree_epsilon_for(accountant, z, rounds, delta, limits, restart_every)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigError(f"privacy.target_epsilon = {target_epsilon} cannot be reached with tree aggregation")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


@dataclass
class PrivacyPlan:
    """What the run promises: noise (z = std / C), what the accountant is told, and the budget."""

    accountant: str
    sampling_rate: float  # q as the accountant sees it (1.0 without amplification)
    noise_multiplier: float  # z: noise std = z * C (for adaptive clipping: of the joint query)
    accounting_noise_multiplier: float  # z * C / sensitivity
    sensitivity: float  # in units of C
    delta: float
    target_epsilon: float  # 0: no budget
    mechanism: str = "gaussian"  # gaussian | tree
    limits: ParticipationLimits = field(default_factory=ParticipationLimits)
    restart_every: int = 0
    projection: dict | None = None  # privacy.projection: the projected deployment's figures

    def epsilon_after(self, rounds: int) -> float:
        if self.mechanism == "tree":
            return tree_epsilon_for(self.accountant, self.accounting_noise_multiplier, rounds, self.delta,
                                    self.limits, self.restart_every)
        return epsilon_for(self.accountant, self.sampling_rate, self.accounting_noise_multiplier, rounds,
                           self.delta)

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds in all stay within the target (always, without a target)."""
        return self.target_epsilon <= 0 or self.epsilon_after(rounds) <= self.target_epsilon * (1 + 1e-9)


def participation_limits(sampling_cfg) -> ParticipationLimits:
    """What the sampler enforces: limited sampling states its limits; Poisson and fixed-size sampling
    may pick a user in every round."""
    if sampling_cfg.method == "limited":
        return ParticipationLimits(sampling_cfg.min_separation, sampling_cfg.max_participations)
    return ParticipationLimits(1, 0)


def make_privacy_plan(cfg, population: int, virtual_clients: int = 0) -> PrivacyPlan:
    """From a validated Config, the number of training users N and (for a projection) the run's M.

    With `privacy.target_epsilon` > 0 and `privacy.calibrate_noise`, z is calibrated so that
    `run.rounds` rounds spend the target; without calibration the configured z runs until the target
    would be exceeded. Either way no round past the target is run.
    """
    p, s = cfg.privacy, cfg.sampling
    delta = p.delta or default_delta(population)
    if p.mechanism == "tree":
        # zero-out neighbours (the participation schedule is public): no displacement, no amplification
        sens = sensitivity_in_clip_norms(s.users_per_client, "poisson")
        limits = participation_limits(s)
        if not p.enabled:
            return PrivacyPlan(p.accountant, 1.0, 0.0, 0.0, sens, delta, 0.0, "tree", limits, p.tree.restart_every)
        if p.target_epsilon > 0 and p.calibrate_noise:
            acc_z = calibrate_tree_z(p.accountant, p.target_epsilon, delta, cfg.run.rounds, limits, p.tree.restart_every)
            z = acc_z * sens
        else:
            z = p.noise_multiplier
            acc_z = z / sens
        return PrivacyPlan(p.accountant, 1.0, z, acc_z, sens, delta, p.target_epsilon, "tree", limits,
                           p.tree.restart_every)
    q = s.rate if s.method == "poisson" else 1.0  # fixed-size: no amplification by sampling
    sens = sensitivity_in_clip_norms(s.users_per_client, s.method)
    if p.enabled and p.projection.population:
        return projected_plan(cfg, q, sens, delta, virtual_clients)
    if not p.enabled:
        return PrivacyPlan(p.accountant, q, 0.0, 0.0, sens, delta, 0.0)
    if p.target_epsilon > 0 and p.calibrate_noise:
        acc_z = calibrate_accounting_z(p.accountant, p.target_epsilon, delta, q, cfg.run.rounds)
        z = noise_multiplier_for(acc_z, s.users_per_client, s.method)
    else:
        z = p.noise_multiplier
        acc_z = accounting_noise_multiplier(z, s.users_per_client, s.method)
    return PrivacyPlan(p.accountant, q, z, acc_z, sens, delta, p.target_epsilon)


def projected_plan(cfg, q: float, sens: float, delta: float, virtual_clients: int) -> PrivacyPlan:
    """z for the projected deployment (target ε at its cohort / population rate), scaled so that this
    run's mean update gets the same noise std: z_run = z_projected x M / M_projected. The plan's own
    figures (and so the run's ledger) are those of the real population; the projection rides along."""
    p, pr, k = cfg.privacy, cfg.privacy.projection, cfg.sampling.users_per_client
    if virtual_clients < 1:
        raise ValueError("a projected plan needs the run's virtual clients per round")
    q_projected = pr.cohort / pr.population
    delta_projected = pr.delta or default_delta(pr.population)
    acc_z_projected = calibrate_accounting_z(p.accountant, p.target_epsilon, delta_projected, q_projected, cfg.run.rounds)
    z_projected = noise_multiplier_for(acc_z_projected, k, "poisson")
    projected_slots = pr.cohort / k
    z = z_projected * virtual_clients / projected_slots
    projection = {
        "population": pr.population, "cohort": pr.cohort, "sampling_rate": q_projected, "delta": delta_projected,
        "noise_multiplier": z_projected, "virtual_clients_per_round": projected_slots,
        "epsilon": epsilon_for(p.accountant, q_projected, acc_z_projected, cfg.run.rounds, delta_projected),
        "valid_for": f"a deployment of {pr.population} users with {pr.cohort} per round; not this population",
    }
    return PrivacyPlan(p.accountant, q, z, z / sens, sens, delta, 0.0, projection=projection)
