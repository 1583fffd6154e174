"""Play a device: record everything one SuperNode receives over a device-mode run and attack it.

What would leak: if a device could learn who else was sampled in a round, the amplification by
sampling the accountant counts on would be void for it. Two ways it could: recover the server's
sampling key from the training key in its task (the old splitmix64-style derivation was invertible),
or read other devices' participation off a field it receives (the old virtual-client index was the
device's rank among the round's sampled devices).

The run is the real ServerApp path (`run_federated`, the DP-FedEmb strategy, its messages) on an
in-process grid; the devices reply a valid zero update instead of training, which changes nothing a
device receives except the model.
"""

import json

import numpy as np
import pytest
import torch

from fedemb.protocol import (CONFIG, LOSS_SUM, NUM_CLIPPED, NUM_EXAMPLES, NUM_FAILED, NUM_NONFINITE, NUM_USERS,
                             NUM_VIRTUAL_CLIENTS, UPDATE_NORMS, read_train_message, train_reply)
from simulations.inprocess import InProcessGrid
from simulations.run import run_federated
from strategies.device_sampling import node_user_ids
from tests.helpers import tiny_config

RATE, ROUNDS, DEVICES = 0.5, 16, 64
MASK64, MASK63 = (1 << 64) - 1, (1 << 63) - 1

# ---------------------------------------------------------------- the old key derivation (before issue 18)
GOLDEN, M1, M2, H0 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x243F6A8885A308D3
OLD_STREAM_SAMPLING, OLD_STREAM_TRAINING_KEY = 1, 21


def old_mix(x):
    x = ((x ^ (x >> 30)) * M1) & MASK64
    x = ((x ^ (x >> 27)) * M2) & MASK64
    return x ^ (x >> 31)


def old_hash(*keys):
    h = H0
    for k in keys:
        h = old_mix(h ^ ((k + GOLDEN + (h << 6) + (h >> 2)) & MASK64))
    return h


def old_member(seed, rnd, user):
    """The old Poisson draw: keyed_uniform(seed, round, user, STREAM_SAMPLING) < q."""
    return (old_hash(seed & MASK64, rnd, user & MASK64, OLD_STREAM_SAMPLING) >> 11) * 2.0 ** -53 < RATE


def old_training_key(seed):
    return old_hash(seed & MASK64, OLD_STREAM_TRAINING_KEY) & MASK63


def test_the_reimplemented_old_derivation_is_the_old_code():
    """Values of the old fedemb.privacy.keyed_random, pinned before it was removed."""
    assert old_hash(3, 4, 5) == 14129911767313709862
    assert old_training_key(0x5EED1234ABCD0042) == 2013162668611874716
    assert (old_hash(7, 2, 11, 1) >> 11) * 2.0 ** -53 == 0.37689200683609647
    assert old_hash(1, -3 & MASK64, 1) == 13119185220292747545


# ---------------------------------------------------------------- the attack
def unmix(y):
    """Inverse of the splitmix64 finaliser: undo each xorshift, multiply by the modular inverses."""
    y ^= (y >> 31) ^ (y >> 62)
    y = (y * pow(M2, -1, 1 << 64)) & MASK64
    y ^= (y >> 27) ^ (y >> 54)
    y = (y * pow(M1, -1, 1 << 64)) & MASK64
    return y ^ (y >> 30) ^ (y >> 60)


def solve_step(v, c):
    """Every h with h ^ (c + (h << 6) + (h >> 2)) == v (mod 2^64): a depth-first search over the bits of
    h from the lowest, tracking the carry. Bit i of the sum needs bit i + 2 of h (through h >> 2), so
    the search guesses bits 0 and 1 and each step fixes bit i + 2 or checks the top bits."""
    out = []

    def bit(x, i):
        return (x >> i) & 1 if 0 <= i < 64 else 0

    def search(i, h, carry):
        if i == 64:
            if h ^ ((c + (h << 6) + (h >> 2)) & MASK64) == v:
                out.append(h)
            return
        for guess in ((0, 1) if i + 2 < 64 else (0,)):
            g = h | (guess << (i + 2))
            total = bit(c, i) + bit(g, i - 6) + bit(g, i + 2) + carry
            if bit(g, i) ^ (total & 1) == bit(v, i):
                search(i + 1, g, total >> 1)

    for low in range(4):
        search(0, low, 0)
    return out


def candidate_seeds(training_key):
    """Old seeds whose training key is `training_key` (its top bit was masked off: both are tried)."""
    seeds = []
    for top in (0, 1 << 63):
        for h1 in solve_step(unmix(training_key | top), (OLD_STREAM_TRAINING_KEY + GOLDEN) & MASK64):
            seed = ((unmix(h1) ^ H0) - GOLDEN - ((H0 << 6) & MASK64) - (H0 >> 2)) & MASK64
            if old_training_key(seed) == training_key:
                seeds.append(seed)
    return seeds


def attack(training_key, own_id, own_rounds, other_ids):
    """Recover the seed from the training key, keep the candidate that best explains the device's own
    sampled rounds, and predict every other device's participation in every round with it."""
    own = set(own_rounds)
    candidates = candidate_seeds(training_key) or [training_key]  # nothing inverts: guess anyway

    def agreement(seed):
        return sum(old_member(seed, r, own_id) == (r in own) for r in range(1, ROUNDS + 1))

    seed = max(candidates, key=agreement)
    consistent = agreement(seed) == ROUNDS
    return seed, consistent, {(r, u): old_member(seed, r, u) for r in range(1, ROUNDS + 1) for u in other_ids}


def accuracy(predicted, sampled_by_round):
    return np.mean([p == (u in sampled_by_round[r]) for (r, u), p in predicted.items()])


# ---------------------------------------------------------------- a device-mode run, recorded
class Recorder:
    """The devices: record every train message, reply a valid zero update."""

    def __init__(self):
        self.received: dict[int, list[dict]] = {}

    def __call__(self, msg, context):
        state, assignment = read_train_message(msg)
        self.received.setdefault(msg.metadata.dst_node_id, []).append({
            "content": sorted(msg.content.keys()),
            "message_type": msg.metadata.message_type, "group_id": msg.metadata.group_id,
            "config": dict(msg.content[CONFIG]),
            "model": {k: tuple(v.shape) for k, v in state.items()}})
        zero = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}
        n = len(assignment.virtual_clients)
        return train_reply(msg, zero, {NUM_VIRTUAL_CLIENTS: n, NUM_USERS: assignment.num_users, NUM_EXAMPLES: 1,
                                       NUM_NONFINITE: 0, NUM_CLIPPED: 0, NUM_FAILED: 0, LOSS_SUM: 0.0,
                                       UPDATE_NORMS: [0.0] * n})

    def rounds_of(self, node):
        return [int(m["config"]["server-round"]) for m in self.received.get(node, [])]

    def sampled_by_round(self):
        out = {r: set() for r in range(1, ROUNDS + 1)}
        for node in self.received:
            for r in self.rounds_of(node):
                out[r].add(node)
        return out


def device_run(tmp_path, online, seed):
    cfg = tiny_config(f"deployment.devices={DEVICES}", "deployment.min_devices=1", "sampling.users_per_client=1",
                      f"sampling.rate={RATE}", f"run.rounds={ROUNDS}", f"run.seed={seed}", "run.eval_every=0",
                      "run.checkpoint_every=0")
    recorder = Recorder()
    grid = InProcessGrid(recorder, DEVICES)  # nodes 1..DEVICES; those online:
    grid.node_ids = list(online)
    run_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    run_dir.mkdir()
    run_federated(grid, cfg, run_dir, show_progress=False)
    return recorder


def ids(nodes):
    return [int(u) for u in node_user_ids(nodes)]


@pytest.mark.slow
def test_a_device_cannot_recover_the_sampling_key_or_predict_other_devices_participation(
        tmp_path, flower_identity):
    nodes = list(range(1, DEVICES + 1))
    me, others = nodes[0], nodes[1:]
    n_predictions = len(others) * ROUNDS
    tolerance = 4 * 0.5 / np.sqrt(n_predictions)  # 4 standard deviations of a coin's accuracy

    # the old derivation: what a device received then, the training key and its own rounds
    old_seed = 0x1D0C_5EED_2A7B_41F3  # as secrets.randbits(63) gave it
    truth = {r: {u for u in others + [me] if old_member(old_seed, r, u)} for r in range(1, ROUNDS + 1)}
    own_rounds = [r for r in truth if me in truth[r]]
    seed, consistent, predicted = attack(old_training_key(old_seed), me, own_rounds, others)
    assert consistent and seed == old_seed  # the server's sampling key, from one field of the task
    assert accuracy(predicted, truth) == 1.0  # every device's participation in every round

    # the current code, an unseeded run: the same attack on what the device really receives
    recorder = device_run(tmp_path, nodes, seed=-1)
    (task,) = {m["config"]["task"] for m in recorder.received[me]}
    training_key = json.loads(task)["training_key"]
    seed, consistent, predicted = attack(training_key, me, recorder.rounds_of(me), others)
    assert not consistent  # no old-style seed explains even the device's own rounds
    sampled = recorder.sampled_by_round()
    assert 0.3 < np.mean([len(s) for s in sampled.values()]) / DEVICES < 0.7  # Poisson at q = 0.5 ran
    assert abs(accuracy(predicted, sampled) - 0.5) < tolerance  # no better than a coin at q = 0.5


@pytest.mark.slow
def test_what_a_device_receives_besides_the_model_does_not_depend_on_other_devices_participation(
        tmp_path, flower_identity):
    """Same device, same run secret, two worlds: all 64 devices online, or only it and a few others.
    In every round it is contacted in both, it receives the same config (round, clip norm, task with
    the training key, its virtual client and that client's index) and model layout. Whether it is
    contacted is the sampler's keyed draw over the online devices (a Binomial count, then a uniform
    subset): a Bernoulli(q) draw it cannot predict in either world (the test above), so the rounds
    themselves may differ."""
    me = 40
    crowded = device_run(tmp_path, range(1, DEVICES + 1), seed=5)
    sparse = device_run(tmp_path, [me, 61, 62, 63], seed=5)
    both = sorted(set(crowded.rounds_of(me)) & set(sparse.rounds_of(me)))
    assert len(both) >= 2

    def received_in(world, rounds):
        return [m for m in world.received[me] if int(m["config"]["server-round"]) in rounds]

    assert received_in(crowded, both) == received_in(sparse, both)
    assert len({json.dumps({k: v for k, v in m["config"].items() if k != "server-round"}, sort_keys=True,
                           default=list) for m in crowded.received[me] + sparse.received[me]}) == 1
    config = crowded.received[me][0]["config"]
    assert list(config["vc-users"]) == ids([me]) and list(config["vc-index"]) == ids([me])
    # the worlds really differ where the old index would have shown it: the number of devices with
    # smaller ids sampled in the device's rounds
    smaller = [[sum(n < me for n in world.sampled_by_round()[r]) for r in crowded.rounds_of(me)]
               for world in (crowded, sparse)]
    assert smaller[0] != smaller[1] and not any(smaller[1])
