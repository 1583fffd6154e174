"""Adaptive clipping: C tracks the target quantile, and the clipped-count query is paid for by inflating
the update noise so that the joint release is exactly the accounted Gaussian mechanism."""

import math

import numpy as np
import pytest
import torch

from fedemb.errors import ConfigError
from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.adaptive_clipping import AdaptiveClipping
from fedemb.privacy.mechanisms import RoundCounts, SampledGaussian
from fedemb.privacy.noise import GaussianNoise


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_clip_norm_converges_to_the_target_quantile_of_the_update_norms(quantile):
    rng = np.random.default_rng(0)
    clients = 200
    clip = AdaptiveClipping(clip_norm=0.01, target_quantile=quantile, learning_rate=0.2, count_std=clients / 20)
    noise = GaussianNoise(0.0, seed=1)
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
        centred = np.sum(norms <= clip.clip_norm) - clients / 2
        clip.update(centred + noise.draw_scalar(clip.count_std), clients)
    target = math.exp(0.5 * math.sqrt(2) * _erfinv(2 * quantile - 1))  # the lognormal's quantile
    assert clip.clip_norm == pytest.approx(target, rel=0.1)


def _erfinv(y: float) -> float:
    from scipy.special import erfinv

    return float(erfinv(y))


@pytest.mark.parametrize("k_sensitivity", [1.0, 2.0])
def test_update_and_count_noise_together_are_the_accounted_gaussian(k_sensitivity):
    """(S_Δ/σ_Δ)² + (S_b/σ_b)² must equal 1/z²: the two queries of a round spend exactly z."""
    z_acc, clip, clients = 1.1, 0.7, 100
    plan = PrivacyPlan("rdp", 0.1, z_acc * k_sensitivity, z_acc, k_sensitivity, 1e-5, 0.0)
    adaptive = AdaptiveClipping(clip, 0.5, 0.2, clients / 20)
    mech = SampledGaussian(plan, clip, GaussianNoise(0.0, seed=0), clients, adaptive)
    s_update, s_count = k_sensitivity * clip, k_sensitivity / 2
    joint = (s_update / mech.update_std) ** 2 + (s_count / adaptive.count_std) ** 2
    assert joint == pytest.approx(1 / z_acc ** 2, rel=1e-12)
    assert mech.update_std > plan.noise_multiplier * clip  # inflated over fixed clipping
    entry = mech.ledger_entry(1, 0)
    assert entry.accounting == {"kind": "sampled_gaussian", "z": z_acc, "q": 0.1, "steps": 1}


def test_count_noise_too_small_for_the_budget_is_refused():
    plan = PrivacyPlan("rdp", 0.1, 2.0, 2.0, 1.0, 1e-5, 0.0)
    with pytest.raises(ConfigError, match="privacy.adaptive.count_noise_std"):
        SampledGaussian(plan, 1.0, GaussianNoise(0.0, seed=0), 10, AdaptiveClipping(1.0, 0.5, 0.2, 0.9))


def test_the_noisy_count_moves_c_after_the_round_and_is_reported():
    plan = PrivacyPlan("rdp", 0.1, 1.0, 1.0, 1.0, 1e-5, 0.0)
    mech = SampledGaussian(plan, 1.0, GaussianNoise(0.0, seed=0), 10, AdaptiveClipping(1.0, 0.5, 0.2, 1e-9 + 10.0))
    std_before = mech.update_std
    mech.privatize({"w": torch.zeros(3)}, RoundCounts(accepted=10, clipped=0))  # all 10 unclipped: C must shrink
    metrics = mech.round_metrics()
    assert metrics["clip-norm"] == 1.0 and metrics["noise-std"] == pytest.approx(std_before)
    assert mech.clip_norm < 1.0
    assert mech.update_std == pytest.approx(std_before * mech.clip_norm)  # noise follows C


def test_the_mechanism_centres_the_rounds_exact_counts_itself():
    """The strategy hands over what arrived (accepted, clipped, Σ bounded loss); each centred query
    (b − ½ per virtual client, loss − B/2 per virtual client) is the mechanism's arithmetic."""
    counts = RoundCounts(accepted=10, clipped=3, bounded_loss_sum=12.5)
    assert counts.centred_unclipped == (10 - 3) - 10 / 2
    assert counts.centred_loss(4.0) == 12.5 - 10 * 4.0 / 2
    assert RoundCounts(accepted=0, clipped=0).centred_unclipped == 0.0  # nothing arrived: the noise alone


def test_noiseless_adaptive_clipping_estimates_the_unclipped_fraction_over_m_not_over_what_arrived():
    plan = PrivacyPlan("rdp", 0.1, 1.0, 1.0, 1.0, 1e-5, 0.0)
    mech = SampledGaussian(plan, 1.0, GaussianNoise(0.0, seed=0), 10, AdaptiveClipping(1.0, 0.5, 0.0, 1e9))
    mech.noise.draw_scalar = lambda std: 0.0  # the exact count, to check the arithmetic
    mech.privatize({"w": torch.zeros(3)}, RoundCounts(accepted=6, clipped=2))
    assert mech.round_metrics()["unclipped-fraction-estimate"] == pytest.approx(((6 - 2) - 6 / 2) / 10 + 0.5)
