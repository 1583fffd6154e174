"""The keyed draws are a PRF of (secret, counters) and the DP noise is a CSPRNG stream: what the
sampling and noise arguments rely on, and what a resumed seeded run needs to replay."""

import time

import numpy as np
import pytest
import torch
from scipy import stats

from fedemb.privacy.keyed_random import SECRET_BYTES, keyed_bytes, keyed_hash, keyed_seed, keyed_uniform, run_secret
from fedemb.privacy.noise import GaussianNoise

SECRET = bytes(range(32))


def test_a_users_draw_depends_only_on_the_secret_its_counters_and_is_the_same_alone_or_vectorized():
    users = np.arange(-5, 2000, 7)
    together = keyed_hash(SECRET, 3, users, 1)
    alone = [int(keyed_hash(SECRET, 3, int(u), 1)) for u in users[::50]]
    assert together[::50].tolist() == alone
    assert keyed_hash(SECRET, np.arange(4)[:, None], users[None, :6], 1).shape == (4, 6)  # keys broadcast
    # uint64 node ids and their int64 view are the same key
    big = np.array([(1 << 64) - 5], dtype=np.uint64)
    assert keyed_hash(SECRET, 1, big, 1) == keyed_hash(SECRET, 1, big.view(np.int64), 1)


def test_every_input_changes_the_draw_and_int_seeds_and_byte_secrets_are_separate_keys():
    base = int(keyed_hash(SECRET, 1, 2, 3))
    variants = [keyed_hash(SECRET[:-1] + b"\x00", 1, 2, 3), keyed_hash(SECRET, 1, 2, 4), keyed_hash(SECRET, 2, 2, 3),
                keyed_hash(SECRET, 1, 2), keyed_hash(SECRET, 1, 2, 3, 0), keyed_hash(5, 1, 2, 3)]
    assert all(int(v) != base for v in variants)
    assert keyed_hash(5, 1) != keyed_hash(b"5", 1)
    assert keyed_bytes(SECRET, 1, 2, size=16)[:8] != keyed_hash(SECRET, 1, 2, 0).tobytes()
    with pytest.raises(TypeError):
        keyed_hash(0.5, 1)


def test_keyed_uniforms_are_uniform_and_streams_are_uncorrelated():
    users = np.arange(200_000)
    a = keyed_uniform(SECRET, 1, users, 1)
    b = keyed_uniform(SECRET, 1, users, 2)
    assert a.min() >= 0 and a.max() < 1
    assert stats.kstest(a, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02  # 4.5 standard errors
    assert 0 <= keyed_seed(SECRET, 7) < 2**63


def test_the_sampler_can_key_a_million_users_well_under_a_second():
    users = np.arange(1_000_000)
    best = min(_seconds(lambda: keyed_uniform(SECRET, 12, users, 1)) for _ in range(3))
    assert best < 1.0  # about 0.06 s on one core


def test_an_unseeded_run_gets_a_fresh_256_bit_secret_and_a_seeded_one_is_reproducible():
    assert len(run_secret(-1)) == SECRET_BYTES and run_secret(-1) != run_secret(-1)
    assert run_secret(3) == run_secret(3) != run_secret(4)


def test_noise_is_normal_with_the_given_std():
    z = GaussianNoise(1.0, seed=SECRET).sample({"a": torch.Size([300, 500]), "b": torch.Size([7])}, 2.0)
    assert z["a"].dtype == torch.float32 and z["a"].shape == (300, 500) and z["b"].shape == (7,)
    x = z["a"].double().flatten().numpy() / 2.0
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01  # 4 to 5 standard errors
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert abs(stats.kurtosis(x)) < 0.05


def test_seeded_noise_replays_from_its_state_and_unseeded_noise_state_is_never_saved():
    shapes = {"w": torch.Size([1001])}
    a = GaussianNoise(1.0, seed=7)
    a.sample(shapes, 1.0), a.draw_scalar(1.0)
    state = a.state_dict()
    after = a.sample(shapes, 1.0)["w"], a.draw_scalar(0.5)
    b = GaussianNoise(1.0, seed=7)
    b.load_state_dict(state)
    assert torch.equal(b.sample(shapes, 1.0)["w"], after[0]) and b.draw_scalar(0.5) == after[1]
    other_seed = GaussianNoise(1.0, seed=8).sample(shapes, 1.0)["w"]
    assert not torch.equal(other_seed, GaussianNoise(1.0, seed=7).sample(shapes, 1.0)["w"])
    fresh = GaussianNoise(1.0)
    assert not fresh.predictable and fresh.state_dict() == {}
    fresh.load_state_dict(state)  # ignored: OS noise is never restored
    assert not torch.equal(fresh.sample(shapes, 1.0)["w"], after[0])


def _seconds(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
