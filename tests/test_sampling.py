"""Who takes part and with whom: the properties the accountant and the sensitivity bound rely on.

What would break the guarantee: a cohort that is not exactly Poisson (a rate other than q, users drawn
together, a count with the wrong spread: the accountant's amplification would not hold); a cohort that
can be computed without the server secret; a grouping that moves other users when one comes or goes
(the sensitivity bound). The statistical tests use fixed secrets, so their outcomes are fixed: each
tolerance is the 10^-3 tail of the statistic's distribution under the property it checks."""

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from fedemb.privacy.sampling import UserSampler, uniform_subset, virtual_client_slots

USERS = np.arange(1000, 3000)
ALPHA = 1e-3  # every statistical check: fail only where the property would be this improbable


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
    cohorts = [set(sampler.sample(r, USERS).tolist()) for r in range(1, 1001)]
    a = np.array([1001 in c for c in cohorts])
    b = np.array([1002 in c for c in cohorts])
    assert abs(np.corrcoef(a, b)[0, 1]) < stats.norm.isf(ALPHA / 2) / np.sqrt(len(cohorts))


def test_every_set_of_users_has_exactly_its_poisson_probability():
    """Four users, every one of the 16 cohorts: frequencies over 4,000 rounds against q^|S| (1-q)^(4-|S|)."""
    q, users, rounds = 0.3, np.array([3, 10, 11, 40]), 4000
    sampler = UserSampler(seed=b"exact", sampling_rate=q, users_per_client=1, virtual_clients=1)
    seen = Counter(tuple(sampler.sample(r, users).tolist()) for r in range(1, rounds + 1))
    cohorts = [c for n in range(5) for c in itertools.combinations(users.tolist(), n)]
    expected = np.array([q ** len(c) * (1 - q) ** (4 - len(c)) for c in cohorts]) * rounds
    assert set(seen) <= set(cohorts)
    assert stats.chisquare([seen[c] for c in cohorts], expected).pvalue > ALPHA


def test_a_uniform_subset_makes_every_subset_of_its_size_equally_likely():
    """The second step of Poisson sampling (and all of fixed-size sampling): 6 choose 3 = 20 subsets."""
    seen = Counter(tuple(uniform_subset(b"subset", r, 6, 3).tolist()) for r in range(1, 4001))
    assert len(seen) == 20 and all(len(set(s)) == 3 for s in seen)
    assert stats.chisquare(list(seen.values())).pvalue > ALPHA
    assert uniform_subset(1, 1, 10, 10).tolist() == list(range(10)) and len(uniform_subset(1, 1, 10, 0)) == 0
    with pytest.raises(ValueError):
        uniform_subset(1, 1, 3, 4)


def test_at_a_million_users_the_cohort_size_varies_like_binomial_n_q():
    """500 rounds of N = 10^6, q = 10^-3: the mean and the spread of the cohort size are those of
    Binomial(N, q) (a fixed-size cohort, or users drawn in pairs, would fail the spread)."""
    n, q, rounds = 1_000_000, 1e-3, 500
    users = np.arange(n, dtype=np.int64) * 3 + 7
    sampler = UserSampler(seed=b"large", sampling_rate=q, users_per_client=8, virtual_clients=125)
    counts = np.array([len(sampler.sample(r, users)) for r in range(1, rounds + 1)])
    mean, var = n * q, n * q * (1 - q)
    assert abs(counts.mean() - mean) < stats.norm.isf(ALPHA / 2) * np.sqrt(var / rounds)
    dispersion = ((counts - mean) ** 2).sum() / var  # chi-square with `rounds` degrees of freedom
    assert stats.chi2.ppf(ALPHA / 2, rounds) < dispersion < stats.chi2.isf(ALPHA / 2, rounds)


def test_at_a_hundred_thousand_users_every_user_is_in_at_rate_q_independently_of_rounds_and_neighbours():
    """200 rounds of N = 10^5, q = 0.1: each user's number of rounds is Binomial(200, q) (histogram,
    chi-square); inclusions are spread evenly over the population's positions (100 blocks, chi-square);
    users next to each other in the id array are in together as often as independence says."""
    n, q, rounds = 100_000, 0.1, 200
    users = np.arange(n, dtype=np.int64)
    sampler = UserSampler(seed=b"rates", sampling_rate=q, users_per_client=1, virtual_clients=10_000)
    member = np.zeros((rounds, n), dtype=bool)
    for r in range(rounds):
        member[r, sampler.sample(r + 1, users)] = True
    per_user = member.sum(axis=0)
    assert abs(per_user.mean() / rounds - q) < stats.norm.isf(ALPHA / 2) * np.sqrt(q * (1 - q) / (n * rounds))
    # each user's count against Binomial(rounds, q), the tails pooled so that every cell expects >= 5
    lo, hi = int(stats.binom.ppf(1e-3, rounds, q)), int(stats.binom.isf(1e-3, rounds, q))
    observed = [np.sum(per_user <= lo)] + [np.sum(per_user == c) for c in range(lo + 1, hi)] + [np.sum(per_user >= hi)]
    p = [stats.binom.cdf(lo, rounds, q)] + [stats.binom.pmf(c, rounds, q) for c in range(lo + 1, hi)] + [
        stats.binom.sf(hi - 1, rounds, q)]
    assert stats.chisquare(observed, np.array(p) * n).pvalue > ALPHA
    assert stats.chisquare(per_user.reshape(100, -1).sum(axis=1)).pvalue > ALPHA
    together = np.sum(member[:, 1:] & member[:, :-1])
    pairs = rounds * (n - 1)
    var = rounds * ((n - 1) * q ** 2 * (1 - q ** 2) + 2 * (n - 2) * (q ** 3 - q ** 4))  # overlapping pairs covary
    assert abs(together - pairs * q ** 2) < stats.norm.isf(ALPHA / 2) * np.sqrt(var)


def test_the_cohort_is_the_same_under_the_same_secret_and_unpredictable_without_it():
    """Another secret (or another round) gives another cohort, overlapping the first no more than two
    independent Poisson samples do (expected q of it): the draws are keyed by the secret."""
    n, q = 1_000_000, 0.01
    users = np.arange(n, dtype=np.int64)

    def cohort(secret, r):
        return UserSampler(seed=secret, sampling_rate=q, users_per_client=1, virtual_clients=1).sample(r, users)

    mine = cohort(b"\x01" * 32, 3)
    assert np.array_equal(mine, cohort(b"\x01" * 32, 3))
    for other in (cohort(b"\x02" * 32, 3), cohort(b"\x01" * 32, 4), cohort(7, 3)):
        overlap = len(np.intersect1d(mine, other))
        assert abs(overlap - len(mine) * q) < stats.norm.isf(ALPHA / 2) * np.sqrt(len(mine) * q * (1 - q))


def test_sampling_a_round_of_ten_million_users_costs_what_its_cohort_costs(monkeypatch):
    """About 1,000 of 10^7 users: the sampler keys a few draws per sampled user and never one per user of
    the population (the time it takes is measured by scripts/benchmark_scale.py, docs/performance.md)."""
    import fedemb.privacy.sampling as sampling

    drawn = []
    for name in ("keyed_hash", "keyed_uniform"):
        real = getattr(sampling, name)

        def counting(secret, round_number, *args, real=real):
            drawn.append(max([np.size(a) for a in args] + [1]))
            return real(secret, round_number, *args)

        monkeypatch.setattr(sampling, name, counting)
    users = np.arange(10_000_000, dtype=np.int64)
    sampler = UserSampler(seed=b"fast", sampling_rate=1e-4, users_per_client=8, virtual_clients=125)
    plan = sampler.plan(2, users)
    assert 800 < len(plan.sampled_users) < 1200
    assert sum(drawn) <= 4 * len(plan.sampled_users) + 64  # O(cohort) keyed values, not O(N)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_removing_one_user_changes_at_most_one_virtual_client_per_round(k):
    """The sensitivity argument: given the round's cohort, a user's presence may only change the
    virtual client it is in (each user's slot is its own keyed draw). Chopping an ordered list into
    consecutive groups would shift every later group. (Who is in the cohort is exactly Poisson, the
    tests above; so with or without the user, the others are in independently at rate q.)"""
    slots = virtual_client_slots(len(USERS), 0.2, k)
    sampler = UserSampler(seed=7, sampling_rate=0.2, users_per_client=k, virtual_clients=slots)
    rng = np.random.default_rng(0)
    for r in range(1, 40):
        cohort = sampler.sample(r, USERS)
        removed = int(rng.choice(cohort))
        with_user = memberships(sampler.group(r, cohort))
        without = memberships(sampler.group(r, cohort[cohort != removed]))
        changed = len(with_user - without)
        assert changed == 1
        assert len(without - with_user) <= 1
        (group,) = with_user - without
        assert removed in group
        assert with_user - {group} == without - {group - {removed}}


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
