"""The noise-limited server step: lr × (expected norm of the noise on the mean update) ≤ limit × C,
set once from the config (never from data), smaller the noisier the run."""

import math

import pytest
import torch

from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.mechanisms import NoPrivacy, SampledGaussian
from fedemb.privacy.noise import GaussianNoise
from strategies.server_optimizer import make_server_optimizer, noise_limited_lr, noise_to_clip_ratio
from tests.helpers import tiny_config

STATE = {"w": torch.zeros(100, 100)}  # d = 10^4


def test_the_ratio_is_the_expected_noise_norm_on_the_mean_in_clip_norms():
    # σ = 2 on the sum, d = 10^4, M = 50, C = 0.4: σ√d / M = 4, over C: 10
    assert noise_to_clip_ratio(2.0, 10_000, 50, 0.4) == pytest.approx(10.0)
    noise = torch.randn(200, 10_000) * 2.0 / 50  # the noise on the mean, 200 draws
    assert float(noise.norm(dim=1).mean()) / 0.4 == pytest.approx(10.0, rel=0.02)
    assert noise_to_clip_ratio(0.0, 10_000, 50, 0.4) == 0.0


@pytest.mark.parametrize("lr, limit, ratio, expected", [
    (1.0, 2.0, 4.0, 0.5),   # noisy: lowered to limit / r
    (1.0, 2.0, 1.0, 1.0),   # quiet: lr as set
    (1.0, 0.0, 4.0, 1.0),   # no limit
    (1.0, 2.0, 0.0, 1.0),   # no noise (non-private)
])
def test_the_step_is_lowered_only_where_the_noise_would_pass_the_limit(lr, limit, ratio, expected):
    assert noise_limited_lr(lr, limit, ratio) == pytest.approx(expected)


def sampled_gaussian(z, clip=0.4, slots=50):
    plan = PrivacyPlan("rdp", 0.2, z, z, 1.0, 1e-5, 0.0)
    return SampledGaussian(plan, clip, GaussianNoise(0.0, seed=0), slots)


def test_the_run_step_follows_the_noise_multiplier_and_ignores_the_data():
    cfg = tiny_config("server.lr=1.0", "server.noise_step_limit=2.0", "privacy.clip_norm=0.4")
    lrs = [make_server_optimizer(cfg, STATE, sampled_gaussian(z), 50).lr for z in (0.5, 1.0, 3.0)]
    assert lrs[0] == 1.0  # r = 0.5·0.4·100/(50·0.4) = 1: under the limit
    assert lrs[1] == 1.0  # r = 2: at the limit
    assert lrs[2] == pytest.approx(2.0 / 6.0)  # r = 6
    assert make_server_optimizer(cfg, STATE, NoPrivacy(50), 50).lr == 1.0
    unlimited = tiny_config("server.lr=1.0", "privacy.clip_norm=0.4")
    assert make_server_optimizer(unlimited, STATE, sampled_gaussian(3.0), 50).lr == 1.0


def test_k_above_one_doubles_the_noise_and_halves_the_step():
    cfg = tiny_config("server.lr=1.0", "server.noise_step_limit=1.0", "privacy.clip_norm=0.4")
    one = SampledGaussian(PrivacyPlan("rdp", 0.2, 2.0, 2.0, 1.0, 1e-5, 0.0), 0.4, GaussianNoise(0.0, seed=0), 50)
    two = SampledGaussian(PrivacyPlan("rdp", 0.2, 2.0, 2.0, 2.0, 1e-5, 0.0), 0.4, GaussianNoise(0.0, seed=0), 50)
    lr_one, lr_two = (make_server_optimizer(cfg, STATE, m, 50).lr for m in (one, two))
    assert lr_two == pytest.approx(lr_one / 2) and math.isfinite(lr_one)
