"""ε must be exactly what Opacus says for the mechanism actually run; a wrong ε is a privacy bug."""

import math
import warnings
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedemb.config import load_config
from fedemb.privacy.accountant import calibrate_accounting_z, default_delta, epsilon_for, make_privacy_plan
from fedemb.privacy.rdp_accountant import ORDER_BLOCKS, privacy_spent
from fedemb.privacy.sensitivity import accounting_noise_multiplier, sensitivity_in_clip_norms
from fedemb.synth.budget import stage_noise_multiplier
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def opacus_rdp_epsilon(q, z, rounds, delta):
    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


def test_epsilon_equals_opacus_for_one_user_per_virtual_client():
    cfg = tiny_config("sampling.users_per_client=1", "privacy.noise_multiplier=1.3", "sampling.rate=0.05")
    plan = make_privacy_plan(cfg, population=5000)
    assert plan.sensitivity == 1.0
    assert plan.epsilon_after(40) == pytest.approx(opacus_rdp_epsilon(0.05, 1.3, 40, default_delta(5000)), rel=1e-9)


def test_virtual_clients_of_several_users_double_the_sensitivity_and_are_accounted_so():
    """With k > 1 the user's virtual client exists with or without them: its clipped update can move
    by 2C. Accounting with sensitivity C would understate ε."""
    cfg = tiny_config("sampling.users_per_client=8", "privacy.noise_multiplier=2.0", "sampling.rate=0.1")
    plan = make_privacy_plan(cfg, population=2000)
    assert plan.sensitivity == 2.0
    assert plan.accounting_noise_multiplier == 1.0
    delta = default_delta(2000)
    assert plan.epsilon_after(25) == pytest.approx(opacus_rdp_epsilon(0.1, 1.0, 25, delta), rel=1e-9)
    assert plan.epsilon_after(25) > opacus_rdp_epsilon(0.1, 2.0, 25, delta)


def test_prv_accountant_matches_opacus_prv():
    cfg = tiny_config("sampling.users_per_client=1", "privacy.noise_multiplier=1.0", "sampling.rate=0.1",
                      'privacy.accountant="prv"', "privacy.delta=1e-5")
    plan = make_privacy_plan(cfg, population=1000)
    acc = PRVAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    assert plan.epsilon_after(20) == pytest.approx(acc.get_epsilon(delta=1e-5, eps_error=0.01), rel=0.02)


def test_default_delta_is_one_over_population_to_the_1_1():
    plan = make_privacy_plan(tiny_config(), population=539)
    assert plan.delta == pytest.approx(539 ** -1.1)


def test_target_epsilon_calibrates_noise_so_the_planned_rounds_fit():
    cfg = tiny_config("privacy.target_epsilon=4.0", "run.rounds=30", "sampling.rate=0.1")
    plan = make_privacy_plan(cfg, population=3000)
    assert 3.9 <= plan.epsilon_after(30) <= 4.0
    assert plan.allows(30)
    assert not plan.allows(31)
    # the configured z is the accountant's z times the sensitivity (k = 4 > 1: 2C)
    assert plan.noise_multiplier == pytest.approx(2 * plan.accounting_noise_multiplier)


def test_fixed_size_sampling_is_refused_unless_accounted_without_amplification():
    from fedemb.errors import ConfigError

    with pytest.raises(ConfigError, match="Poisson"):
        tiny_config('sampling.method="fixed"')
    cfg = tiny_config('sampling.method="fixed"', 'privacy.fixed_size_accounting="no_amplification"',
                      "sampling.users_per_client=1", "privacy.noise_multiplier=3.0")
    plan = make_privacy_plan(cfg, population=1000)
    # no amplification (q = 1) and a displaced user: sensitivity 2C
    assert plan.sampling_rate == 1.0 and plan.sensitivity == 2.0
    assert plan.epsilon_after(10) == pytest.approx(opacus_rdp_epsilon(1.0, 1.5, 10, plan.delta), rel=1e-9)


def test_no_noise_means_infinite_epsilon():
    plan = make_privacy_plan(tiny_config("privacy.noise_multiplier=0"), population=100)
    assert math.isinf(plan.epsilon_after(1))


@pytest.mark.parametrize("k,method,expected", [(1, "poisson", 1), (8, "poisson", 2), (1, "fixed", 2), (8, "fixed", 4)])
def test_sensitivity_table(k, method, expected):
    assert sensitivity_in_clip_norms(k, method) == expected
    assert accounting_noise_multiplier(4.0, k, method) == 4.0 / expected


def test_the_projection_sets_the_noise_for_the_large_deployment_and_the_ledger_keeps_the_real_epsilon():
    """Projected: the noise on the mean update equals what a cohort of 1,000 from 10^6 users would get at
    ε = 4; that ε is Opacus's for the projected deployment. The run's own plan is honest about this
    population: same z, real q and δ, and a far larger ε."""
    cfg = tiny_config("sampling.users_per_client=1", "sampling.rate=0.2", "run.rounds=30", "privacy.target_epsilon=4",
                      "privacy.projection.population=1000000", "privacy.projection.cohort=1000")
    plan = make_privacy_plan(cfg, population=539, virtual_clients=108)
    pr = plan.projection
    assert pr["sampling_rate"] == 1e-3 and pr["delta"] == pytest.approx(default_delta(10**6))
    assert pr["epsilon"] == pytest.approx(opacus_rdp_epsilon(1e-3, pr["noise_multiplier"], 30, pr["delta"]), rel=1e-9)
    assert pr["epsilon"] <= 4.0 and pr["epsilon"] > 3.9  # calibrated to the target (1% tolerance)
    # noise std on the mean: z_run * C / 108 == z_projected * C / 1000
    assert plan.noise_multiplier / 108 == pytest.approx(pr["noise_multiplier"] / 1000, rel=1e-12)
    assert plan.sampling_rate == 0.2 and plan.delta == pytest.approx(default_delta(539))
    assert plan.target_epsilon == 0.0  # the real ledger is reported, not capped at the projected target
    real = plan.epsilon_after(30)
    assert real == pytest.approx(opacus_rdp_epsilon(0.2, plan.noise_multiplier, 30, plan.delta), rel=1e-9)
    assert real > 10 * pr["epsilon"]


@pytest.mark.parametrize("overrides, message", [
    (["privacy.projection.cohort=0"], "cohort must be in"),
    (["privacy.target_epsilon=0"], "target_epsilon"),
    (["privacy.mechanism=tree", "sampling.method=limited"], "sampled Gaussian"),
])
def test_a_projection_needs_a_cohort_a_target_and_the_sampled_gaussian(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config("sampling.users_per_client=1", "privacy.target_epsilon=4", "privacy.projection.population=1000000",
                    "privacy.projection.cohort=1000", *overrides)


# ---------------------------------------------------------------- RDP orders past Opacus's defaults


def default_orders_privacy_spent(q, z, rounds, delta):
    """Opacus's (ε, best order) with its default orders; it warns when the best one is an extreme."""
    acc = RDPAccountant()
    acc.history = [(z, q, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_privacy_spent(delta=delta)


@pytest.mark.parametrize("q, z, rounds, delta", [(0.01, 5.0, 10, 1e-5), (0.02, 8.0, 5, 1e-5), (1.0, 20.0, 1, 1e-5)])
def test_when_the_best_default_order_is_the_largest_more_orders_tighten_epsilon_without_a_warning(q, z, rounds, delta):
    """Much noise, small q, few rounds: Opacus's default orders end below the best order, so its ε is
    loose (and it warns). The extended orders find an interior best order and a smaller ε, never a larger one."""
    eps_default, order_default = default_orders_privacy_spent(q, z, rounds, delta)
    assert order_default == RDPAccountant.DEFAULT_ALPHAS[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Opacus's "Optimal order is the largest alpha" would fail the test
        eps = epsilon_for("rdp", q, z, rounds, delta)
        eps_again, order = privacy_spent([(z, q, rounds)], delta)
        # Opacus itself, given the orders up to twice the best, finds the same best order inside them
        wider = [a for block in ORDER_BLOCKS for a in block if a <= 2 * order]
        acc = RDPAccountant()
        acc.history = [(z, q, rounds)]
        eps_opacus, order_opacus = acc.get_privacy_spent(delta=delta, alphas=wider)
    assert eps == eps_again <= eps_default
    assert order_default < order < wider[-1]
    assert (eps_opacus, order_opacus) == (pytest.approx(eps, rel=1e-12), order)


@pytest.mark.parametrize("q, z, rounds, delta", [(0.1, 0.8, 40, default_delta(1120)),  # the quickstart
                                                 (1.0, 1.5, 10, 1e-5)])
def test_where_a_default_order_is_best_epsilon_is_opacus_default(q, z, rounds, delta, recwarn):
    eps_default, order_default = default_orders_privacy_spent(q, z, rounds, delta)
    assert order_default < RDPAccountant.DEFAULT_ALPHAS[-1]
    assert epsilon_for("rdp", q, z, rounds, delta) == pytest.approx(eps_default, rel=1e-9)
    assert not [w for w in recwarn if "alpha" in str(w.message)]


def test_calibration_uses_the_same_orders_so_a_small_target_is_reachable():
    """With Opacus's default orders ε cannot go below about log(1/δ) / 62 (0.19 at δ = 1e-5), whatever
    the noise; with the same orders as the accounting, the calibrated z spends the target."""
    q, target, rounds, delta = 0.01, 0.05, 10, 1e-5
    assert default_orders_privacy_spent(q, 1e4, rounds, delta)[0] > target
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = calibrate_accounting_z("rdp", target, delta, q, rounds)
        eps = epsilon_for("rdp", q, z, rounds, delta)
    assert target - 0.01 <= eps <= target


@pytest.mark.parametrize("overrides", [["privacy.target_epsilon=0.5"], ["privacy.noise_multiplier=5", "run.rounds=3"]])
def test_planning_the_quickstart_with_a_target_or_much_noise_warns_nothing(overrides):
    """Calibration tries large z on the way, whose best order is past the defaults: Opacus used to warn
    whenever the quickstart was given a target."""
    cfg = load_config(ROOT / "simulations/configs/quickstart.toml", overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = make_privacy_plan(cfg, population=1120)
        assert plan.epsilon_after(cfg.run.rounds) <= (plan.target_epsilon or math.inf)


def test_a_synthesis_stage_calibrates_with_the_same_orders():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = stage_noise_multiplier(0.1, 1e-5, "rdp")
        assert 0.1 - 0.005 <= epsilon_for("rdp", 1.0, z, 1, 1e-5) <= 0.1
