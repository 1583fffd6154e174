"""Procedural populations (fedemb.data.procedural): N users generated from (seed, user id) over a real
base dataset. What would break if these failed: a node training other data than another node would for
the same user (the update no longer a function of the user), memory or a round's cost growing with N,
one user's presence moving other users between virtual clients (the sensitivity argument), or the
held-out evaluation writers leaking into training through a derived user."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

from fedemb.config import load_config
from fedemb.data.population import UserRange
from fedemb.data.procedural import ProceduralPopulation
from fedemb.data.store import load_splits
from fedemb.errors import ConfigError
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import NoPrivacy
from fedemb.privacy.sampling import UserSampler, virtual_client_slots
from fedemb.training.client_task import make_task
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import ServerOptimizer
from strategies.worker_assignment import assign_balanced
from tests.helpers import tiny_config

TEN_MILLION = 10_000_000
PROCEDURAL = ['data.name="procedural"', "data.num_users=40"]


def procedural_config(*overrides):
    return load_config(None, [*PROCEDURAL, *overrides])


@pytest.fixture(scope="module")
def splits():
    return load_splits(procedural_config(f"data.procedural.users={TEN_MILLION}").data)


def digest(pop, users) -> str:
    made = pop.generate(np.asarray(users))
    h = hashlib.sha256()
    for part in (made.counts, made.labels, made.images):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


USERS = [0, 1, 7, 123_456, TEN_MILLION - 1]


def test_a_users_data_is_identical_in_two_separately_built_populations(splits):
    again = ProceduralPopulation(splits.train.settings, splits.train.pool.base)
    assert digest(splits.train, USERS) == digest(again, USERS)


def test_a_users_data_does_not_depend_on_the_users_generated_with_it(splits):
    pop = splits.train
    for u in USERS:
        alone = pop.generate([u])
        among = pop.generate([*range(100, 140), u, 99])  # in a later chunk of a cohort's generation
        start, count = int(among.starts[40]), int(among.counts[40])
        assert count == int(alone.counts[0])
        assert np.array_equal(among.images[start:start + count], alone.images)
        assert np.array_equal(among.labels[start:start + count], alone.labels)


def test_a_users_rows_are_the_same_however_they_are_read(splits):
    pop = splits.train
    rows = pop.examples_of(123_456)
    assert len(rows) == int(pop.examples_count([123_456])[0])
    assert pop.settings.examples_min <= len(rows) <= pop.settings.examples_max
    whole = pop.of_users([123_456])
    shuffled = np.random.default_rng(0).permutation(rows)
    assert np.array_equal(pop.labels[shuffled], whole.labels[shuffled - rows[0]])
    assert np.array_equal(pop.images[shuffled], whole.images[shuffled - rows[0]])
    assert torch.equal(pop.tensor(rows[:3]), whole.tensor(np.arange(3)))


def test_two_users_differ(splits):
    a, b = splits.train.of_users([5]), splits.train.of_users([6])
    assert not (len(a) == len(b) and np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels))
    # even two users of one writer: their transformations differ
    pop = splits.train
    writers = pop.writers_of(np.arange(2000))
    same = np.flatnonzero(writers == writers[0])[:2]
    x, y = pop.generate(same[:1]), pop.generate(same[1:2])
    assert not np.array_equal(x.images[:1], y.images[:1])


def test_other_seeds_make_other_populations(splits):
    other = load_splits(procedural_config(f"data.procedural.users={TEN_MILLION}", "data.procedural.seed=1").data).train
    assert digest(other, USERS) != digest(splits.train, USERS)


@pytest.mark.slow
def test_a_users_data_is_identical_in_another_process(splits):
    """A node that trains user u in another process (another Ray worker, another machine) regenerates
    the same bytes: nothing is sent but (seed, u)."""
    script = (
        "import json, hashlib, numpy as np\n"
        "from fedemb.config import load_config\n"
        "from fedemb.data.store import load_splits\n"
        f"cfg = load_config(None, {[*PROCEDURAL, f'data.procedural.users={TEN_MILLION}']!r})\n"
        "pop = load_splits(cfg.data).train\n"
        f"made = pop.generate(np.asarray({USERS!r}))\n"
        "h = hashlib.sha256()\n"
        "[h.update(np.ascontiguousarray(p).tobytes()) for p in (made.counts, made.labels, made.images)]\n"
        "print(json.dumps(h.hexdigest()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == digest(splits.train, USERS)


def test_building_ten_million_users_allocates_nothing_per_user(splits):
    base = splits.train.pool.base
    tracemalloc.start()
    try:
        pop = ProceduralPopulation(splits.train.settings, base)
        ids = pop.user_ids
        n, count = len(ids), pop.num_users
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == count == TEN_MILLION and isinstance(ids, UserRange)
    assert peak < 2 << 20, f"{peak} bytes: an array of one byte per user alone would be {TEN_MILLION}"


def test_a_round_at_ten_million_users_touches_only_its_cohort(splits):
    """Sampling, grouping and the balanced assignment of a round (the server's whole round plan):
    memory and time of the cohort (about 1,000 users), not of the 10^7."""
    pop = splits.train
    q, k = 1e-4, 8
    slots = virtual_client_slots(pop.num_users, q, k)
    cfg = tiny_config()
    strategy = DPFedEmb(sampler=UserSampler(0, q, k, slots), user_ids=pop.user_ids,
                        task=make_task(cfg, pop.num_classes, pop.image_shape, 0), mechanism=NoPrivacy(slots),
                        server_optimizer=ServerOptimizer({"w": torch.zeros(2)}, 1.0, 0.0),
                        ledger=PrivacyLedger(None, 1e-7), user_examples=pop.examples_count)
    strategy.sampler.plan(0, strategy.user_ids)  # the first draw imports scipy.stats: not per user
    tracemalloc.start()
    try:
        started = time.perf_counter()
        plan = strategy.sampler.plan(1, strategy.user_ids)
        sampling_s = time.perf_counter() - started
        # what configure_train does with the plan: each virtual client's cost, the balanced assignment
        per_node = assign_balanced(plan.virtual_clients, [strategy._cost(vc) for vc in plan.virtual_clients], [11, 12])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 800 < len(plan.sampled_users) < 1200
    assert sum(len(vcs) for vcs in per_node.values()) == len(plan.virtual_clients)
    assert peak < 4 << 20, f"{peak} bytes for a round's plan: an int64 per user would be {8 * TEN_MILLION}"
    assert sampling_s < 2.0  # about 10 ms on 2 cores; the bound only catches O(N) work


def test_removing_a_user_changes_at_most_one_virtual_client(splits):
    sampler = UserSampler(3, 1e-4, 8, virtual_client_slots(TEN_MILLION, 1e-4, 8))
    for round_number in (1, 2, 3):
        plan = sampler.plan(round_number, splits.train.user_ids)
        for removed in plan.sampled_users[[0, len(plan.sampled_users) // 2, -1]]:
            without = sampler.group(round_number, plan.sampled_users[plan.sampled_users != removed])
            before = {vc.index: vc.user_ids for vc in plan.virtual_clients}
            after = {vc.index: vc.user_ids for vc in without}
            changed = [slot for slot in before.keys() | after.keys() if before.get(slot) != after.get(slot)]
            assert len(changed) == 1 and removed in before[changed[0]]


def test_held_out_writers_are_disjoint_from_every_procedural_users_writer(splits):
    pop = splits.train
    pool = set(pop.pool.writers.tolist())
    held_out = set(np.unique(np.asarray(splits.eval.users)).tolist())
    assert pool and held_out and not pool & held_out
    used = set(pop.writers_of(np.random.default_rng(0).integers(0, TEN_MILLION, 5000)).tolist())
    assert used <= pool and len(used) > len(pool) // 2
    assert splits.eval is load_splits(procedural_config().data.procedural_base()).eval  # real users, the base's own


def test_held_out_mnist_writers_are_disjoint_from_every_procedural_users_writer(tmp_path):
    from tests.test_data import make_mnist_like, write_idx

    _, labels = make_mnist_like(tmp_path)
    table = np.zeros((len(labels), 8), dtype=np.int64)
    table[:, 0], table[:, 2] = labels, np.repeat(np.arange(1000, 1040), 10)
    write_idx(tmp_path / "writers.gz", table, code=0x0C)
    cfg = load_config(None, ['data.name="procedural"', 'data.procedural.base="mnist"', f'data.path="{tmp_path}"',
                             f'data.writers="{tmp_path / "writers.gz"}"', "data.eval_users=0.25",
                             "data.procedural.users=1000"])
    s = load_splits(cfg.data)
    used = set(s.train.writers_of(np.arange(1000)).tolist())
    held_out = set(np.unique(np.asarray(s.eval.users)).tolist())
    assert len(held_out) == 10 and len(used) == 30 and not used & held_out
    assert s.train.image_shape == (1, 28, 28) and s.train.tensor(s.train.examples_of(999)).shape[1:] == (1, 28, 28)


def test_a_user_draws_only_classes_its_writer_wrote(splits):
    pop = splits.train
    users = np.arange(300)
    made = pop.generate(users)
    writer_rows = np.searchsorted(pop.pool.writers, pop.writers_of(users))
    owner = np.repeat(np.arange(len(users)), made.counts)
    assert np.all(pop.pool.counts[writer_rows[owner], made.labels] > 0)


def test_the_node_builds_the_population_once_per_process():
    cfg = procedural_config(f"data.procedural.users={TEN_MILLION}").data
    assert load_splits(cfg).train is load_splits(cfg).train  # cached: a node's train messages reuse it


@pytest.mark.parametrize("override, says", [
    (["data.procedural.examples_min=50"], "data.procedural.examples_min (50) must be <= data.procedural.examples_max"),
    (["data.procedural.users=0"], "data.procedural.users must be in [1, "),
    (["data.procedural.blur=1"], "unknown key 'data.procedural.blur'"),
    (['data.procedural.base="emnist"'], "data.procedural.base must be one of digits, mnist"),
    (['data.procedural.base="mnist"'], "data.procedural.base = 'mnist' needs data.path"),
    (['data.path="/x"'], "data.path, data.writers"),
])
def test_a_bad_procedural_config_is_one_line_naming_the_key(override, says):
    with pytest.raises(ConfigError) as err:
        procedural_config(*override)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_procedural_settings_on_another_source_are_refused():
    with pytest.raises(ConfigError, match="data.procedural applies to data.name = 'procedural' only"):
        load_config(None, ["data.procedural.users=5"])


@pytest.mark.slow
def test_a_run_over_a_million_procedural_users_trains_and_accounts_for_that_population(tmp_path):
    """The whole path in one process: run setup, sampling, worker assignment, the nodes generating their
    users, evaluation on the real held-out writers, and accounting with N = 10^6."""
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    cfg = load_config(None, [*PROCEDURAL, "data.procedural.users=1000000", 'model.name="fedemb_lenet_small"',
                             "model.embedding_dim=8", "sampling.rate=2e-5", "sampling.users_per_client=1",
                             "client.epochs=1", "run.rounds=2", "run.seed=1", "run.eval_every=0"])
    results = run_federated(InProcessGrid(train, 2), cfg, tmp_path / "run", show_progress=False)
    assert results["rounds_completed"] == 2 and results["privacy"]["population"] == 1_000_000
    rounds = [json.loads(line) for line in (tmp_path / "run" / "private" / "telemetry.jsonl").read_text().splitlines()]
    trained = sum(r["virtual-clients-accepted"] for r in rounds)
    assert trained == sum(r["virtual-clients-planned"] for r in rounds) > 0 and sum(r["examples"] for r in rounds) > 0
    assert 0 < results["privacy"]["epsilon"] < float("inf") and results["privacy"]["delta"] < 1e-6
