"""Who takes part and with whom: the properties the accountant and the sensitivity bound rely on."""

import numpy as np
import pytest

from fedemb.privacy.sampling import UserSampler, virtual_client_slots

USERS = np.arange(1000, 3000)


def memberships(vcs):
    return {frozenset(vc.user_ids) for vc in vcs}


def test_no_user_is_in_two_virtual_clients_in_a_round():
    sampler = UserSampler(seed=3, sampling_rate=0.3, users_per_client=8, virtual_clients=75)
    for r in range(1, 30):
        plan = sampler.plan(r, USERS)
        members = [u for vc in plan.virtual_clients for u in vc.user_ids]
        assert len(members) == len(set(members)) == len(plan.sampled_users)


def test_poisson_rate_matches_q_over_many_rounds():
    q = 0.05
    sampler = UserSampler(seed=11, sampling_rate=q, users_per_client=8, virtual_clients=12)
    counts = np.array([len(sampler.sample(r, USERS)) for r in range(1, 401)])
    rate = counts.sum() / (len(USERS) * len(counts))
    se = np.sqrt(q * (1 - q) / (len(USERS) * len(counts)))
    assert abs(rate - q) < 5 * se
    # Poisson sampling: the round size varies like Binomial(N, q), it is not fixed
    assert counts.std() == pytest.approx(np.sqrt(len(USERS) * q * (1 - q)), rel=0.25)


def test_each_user_is_sampled_independently_of_the_others():
    sampler = UserSampler(seed=5, sampling_rate=0.5, users_per_client=4, virtual_clients=10)
    rounds = range(1, 2001)
    a = np.array([1001 in set(sampler.sample(r, USERS)) for r in rounds])
    b = np.array([1002 in set(sampler.sample(r, USERS)) for r in rounds])
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1


@pytest.mark.parametrize("k", [1, 4, 8])
def test_removing_one_user_changes_at_most_one_virtual_client_per_round(k):
    """The sensitivity argument: a user's presence may only change the virtual client it is in.
    Chopping an ordered list into consecutive groups would shift every later group."""
    slots = virtual_client_slots(len(USERS), 0.2, k)
    sampler = UserSampler(seed=7, sampling_rate=0.2, users_per_client=k, virtual_clients=slots)
    rng = np.random.default_rng(0)
    for r in range(1, 40):
        removed = int(rng.choice(USERS))
        with_user = memberships(sampler.plan(r, USERS).virtual_clients)
        without = memberships(sampler.plan(r, USERS[USERS != removed]).virtual_clients)
        changed = len(with_user - without)
        assert changed <= 1
        assert len(without - with_user) <= 1
        if changed:
            (group,) = with_user - without
            assert removed in group


def test_fixed_size_sampling_draws_exactly_q_n_users_without_replacement():
    sampler = UserSampler(seed=1, sampling_rate=0.1, users_per_client=8, virtual_clients=25, method="fixed")
    for r in range(1, 10):
        sampled = sampler.sample(r, USERS)
        assert len(sampled) == 200 == len(set(sampled.tolist()))


def test_groups_are_new_every_round():
    sampler = UserSampler(seed=2, sampling_rate=1.0, users_per_client=8, virtual_clients=250)
    assert memberships(sampler.plan(1, USERS).virtual_clients) != memberships(sampler.plan(2, USERS).virtual_clients)


def test_virtual_client_sizes_average_k():
    sampler = UserSampler(seed=2, sampling_rate=0.4, users_per_client=8, virtual_clients=100)
    sizes = [len(vc.user_ids) for r in range(1, 20) for vc in sampler.plan(r, USERS).virtual_clients]
    assert np.mean(sizes) == pytest.approx(8, rel=0.1)
