"""ε must be exactly what Opacus says for the mechanism actually run; a wrong ε is a privacy bug."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedemb.privacy.accountant import default_delta, make_privacy_plan
from fedemb.privacy.sensitivity import accounting_noise_multiplier, sensitivity_in_clip_norms
from tests.helpers import tiny_config


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
