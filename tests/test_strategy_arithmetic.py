"""The server's DP arithmetic on hand-computed updates: clip check, noise std, fixed denominator,
momentum. Each failure here is a privacy or correctness bug, not a tuning issue."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message

from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import NoPrivacy, RoundCounts, RoundMechanism, SampledGaussian
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import UserSampler
from fedemb.protocol import TrainAssignment, train_message, train_reply
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import ServerOptimizer
from fedemb.training.client_task import make_task
from tests.helpers import tiny_config

ANY_TASK = make_task(tiny_config(), num_classes=10, image_shape=(1, 8, 8), training_key=0)

STATE = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}


def gaussian(noise_std, clip, slots, seed=0):
    """The sampled Gaussian mechanism with noise std `noise_std` on the sum (k > 1: sensitivity 2C)."""
    if not clip:
        return NoPrivacy()
    z = noise_std / clip
    return SampledGaussian(PrivacyPlan("rdp", 0.5, z, z / 2, 2.0, 1e-5, 0.0), clip, GaussianNoise(noise_std, seed), slots)


def make_strategy(noise_std=0.0, clip=1.0, slots=4, lr=1.0, momentum=0.0, seed=0, state=STATE):
    return DPFedEmb(sampler=UserSampler(0, 0.5, 2, slots), user_ids=np.arange(8), task=ANY_TASK,
                    mechanism=gaussian(noise_std, clip, slots, seed),
                    server_optimizer=ServerOptimizer(state, lr, momentum), ledger=PrivacyLedger(None, 1e-5))


def assign(strategy, counts):
    """Node n is assigned counts[n] virtual clients; returns the train messages."""
    strategy.assignments = {n: TrainAssignment(1, strategy.clip_norm, ANY_TASK, [(n * 10 + j, (j,)) for j in range(c)])
                            for n, c in enumerate(counts)}
    return {n: train_message(STATE, a, n) for n, a in strategy.assignments.items()}


def reply(msg, a, b, count, loss_sum=0.0, nonfinite=0):
    update = {"a": torch.full((2, 2), float(a)), "b": torch.full((3,), float(b))}
    return train_reply(msg, update, {"num-virtual-clients": count, "num-users": count, "num-examples": 1,
                                     "num-nonfinite": nonfinite, "num-clipped": 0, "train-loss-sum": loss_sum,
                                     "update-norms": [0.0] * count})


def new_state(arrays: ArrayRecord):
    return {k: v for k, v in arrays.to_torch_state_dict().items()}


def test_sum_is_divided_by_the_fixed_slot_count_not_by_the_replies(flower_identity):
    s = make_strategy(slots=4)
    msgs = assign(s, [1, 1])
    arrays, metrics = s.aggregate_train(1, [reply(msgs[0], 0.1, 0.0, 1), reply(msgs[1], 0.3, 0.0, 1)])
    # w_new = w - lr * sum / M = 0 - (0.1 + 0.3) / 4
    assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.1))
    assert metrics["denominator"] == 4.0 and metrics["virtual-clients-accepted"] == 2


def test_a_lost_reply_does_not_change_the_denominator(flower_identity):
    s = make_strategy(slots=4)
    msgs = assign(s, [1, 1])
    arrays, metrics = s.aggregate_train(1, [reply(msgs[0], 0.1, 0.0, 1)])
    assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.025))
    assert metrics["virtual-clients-missing"] == 1


def test_an_update_above_count_times_clip_norm_is_rejected(flower_identity):
    """A node that skipped clipping must not get its update into the aggregate."""
    s = make_strategy(clip=1.0, slots=4)
    msgs = assign(s, [1, 2])
    # node 0: norm sqrt(4 * 0.6^2) = 1.2 > 1 x C: rejected. node 1: norm 1.2 <= 2 x C: accepted
    arrays, metrics = s.aggregate_train(1, [reply(msgs[0], 0.6, 0.0, 1), reply(msgs[1], 0.6, 0.0, 2)])
    assert metrics["virtual-clients-rejected"] == 1 and metrics["virtual-clients-accepted"] == 2
    assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.6 / 4))


def test_a_reply_claiming_another_count_than_assigned_is_rejected(flower_identity):
    s = make_strategy(clip=1.0)
    msgs = assign(s, [1])
    _, metrics = s.aggregate_train(1, [reply(msgs[0], 0.4, 0.0, 2)])  # claims 2 to pass a 2C norm check
    assert metrics["virtual-clients-rejected"] == 1 and metrics["virtual-clients-accepted"] == 0


def test_nan_error_and_malformed_replies_are_counted_and_skipped(flower_identity):
    s = make_strategy(slots=4)
    msgs = assign(s, [1, 1, 1, 1])
    bad_shape = train_reply(msgs[2], {"a": torch.zeros(4), "b": torch.zeros(3)}, {"num-virtual-clients": 1})
    extra_key = train_reply(msgs[3], {**STATE, "head.weight": torch.zeros(2)}, {"num-virtual-clients": 1})
    replies = [reply(msgs[0], float("nan"), 0.0, 1), Message(Error(code=0, reason="boom"), reply_to=msgs[1]),
               bad_shape, extra_key]
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["virtual-clients-failed"] == 1 and metrics["virtual-clients-rejected"] == 3
    assert torch.equal(new_state(arrays)["a"], torch.zeros(2, 2))


def test_replies_from_unassigned_nodes_are_rejected(flower_identity):
    s = make_strategy()
    msgs = assign(s, [1])
    stranger = train_message(STATE, TrainAssignment(1, 1.0, ANY_TASK, [(0, (1,))]), 99)
    _, metrics = s.aggregate_train(1, [reply(msgs[0], 0.1, 0, 1), reply(msgs[0], 0.1, 0, 1), reply(stranger, 0.1, 0, 1)])
    assert metrics["virtual-clients-accepted"] == 1 and metrics["virtual-clients-rejected"] == 2


def test_noise_has_std_z_times_c_before_the_division(flower_identity):
    """N(0, (zC)^2) is added to the SUM; the mean therefore carries zC / M."""
    big = {"w": torch.zeros(200_000)}
    s = make_strategy(noise_std=2.0 * 0.5, clip=0.5, slots=5, seed=123, state=big)
    s.assignments = {}
    arrays, metrics = s.aggregate_train(1, [])
    w = arrays.to_torch_state_dict()["w"]
    assert metrics["noise-std"] == 1.0
    assert float(w.std()) == pytest.approx(1.0 / 5, rel=0.01)
    # seeded noise is reproducible: the same seed gives the same draw
    expected = -GaussianNoise(1.0, seed=123).add({"w": torch.zeros(200_000)})["w"] / 5
    assert torch.allclose(w, expected)


def test_unseeded_noise_differs_between_runs():
    a = GaussianNoise(1.0).add({"w": torch.zeros(100)})["w"]
    b = GaussianNoise(1.0).add({"w": torch.zeros(100)})["w"]
    assert not torch.equal(a, b)


def test_server_momentum_follows_sgd_with_momentum(flower_identity):
    s = make_strategy(slots=1, lr=0.5, momentum=0.9)
    for round_number, value in ((1, 0.2), (2, 0.1)):
        msgs = assign(s, [1])
        arrays, _ = s.aggregate_train(round_number, [reply(msgs[0], value, 0.0, 1)])
    # v1 = 0.2, w1 = -0.1; v2 = 0.9 * 0.2 + 0.1 = 0.28, w2 = -0.1 - 0.5 * 0.28 = -0.24
    assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.24))


def test_configure_train_sends_one_message_per_node_with_all_its_virtual_clients(flower_identity):
    class TwoNodes:
        def get_node_ids(self):
            return [7, 9]

    s = make_strategy(slots=6)
    s.user_ids, s.user_examples = np.arange(100), lambda users: np.ones(len(users), dtype=np.int64)
    s.sampler = UserSampler(1, 0.5, 4, 12)
    msgs = list(s.configure_train(1, ArrayRecord(STATE), None, TwoNodes()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [7, 9]
    planned = s.sampler.plan(1, s.user_ids)
    sent = sorted(u for a in s.assignments.values() for _, users in a.virtual_clients for u in users)
    assert sent == sorted(planned.sampled_users.tolist())
    assert math.isclose(sum(len(a.virtual_clients) for a in s.assignments.values()), len(planned.virtual_clients))


def test_train_loss_is_the_mean_over_virtual_clients_that_trained_normally(flower_identity):
    s = make_strategy(slots=4)
    msgs = assign(s, [2, 1])
    # node 0: two virtual clients, one diverged (zero update, loss left out); node 1: one, loss 3
    _, metrics = s.aggregate_train(1, [reply(msgs[0], 0.0, 0.0, 2, loss_sum=1.0, nonfinite=1),
                                       reply(msgs[1], 0.0, 0.0, 1, loss_sum=3.0)])
    assert metrics["train-loss"] == 2.0
    assert metrics["virtual-clients-nonfinite"] == 1 and metrics["virtual-clients-accepted"] == 3



class Recording(RoundMechanism):
    """A mechanism that adds nothing and keeps what the strategy handed it."""
    name, clip_norm = "recording", 1.0

    def privatize(self, total, counts):
        self.counts = counts
        return {k: v.clone() for k, v in total.items()}

    def round_metrics(self):
        return {}


def test_the_strategy_hands_the_mechanism_the_exact_counts_of_what_it_accepted(flower_identity):
    """Centring and noising the counts is the mechanism's; the strategy only sums the accepted replies."""
    s = make_strategy(slots=4)
    s.mechanism = Recording()
    msgs = assign(s, [2, 1, 1])
    clipped = train_reply(msgs[1], {"a": torch.zeros(2, 2), "b": torch.zeros(3)},
                          {"num-virtual-clients": 1, "num-users": 1, "num-examples": 1, "num-nonfinite": 0,
                           "num-clipped": 1, "train-loss-sum": 0.0, "update-norms": [0.0]})
    s.aggregate_train(1, [reply(msgs[0], 0.0, 0.0, 2), clipped, reply(msgs[2], 0.9, 0.0, 2)])  # node 2 lies
    assert s.mechanism.counts == RoundCounts(accepted=3, clipped=1, bounded_loss_sum=0.0)

def test_a_reply_claiming_other_users_than_assigned_is_rejected(flower_identity):
    s = make_strategy(clip=1.0)
    msgs = assign(s, [2])  # two virtual clients of one user each
    lying = train_reply(msgs[0], {"a": torch.zeros(2, 2), "b": torch.zeros(3)},
                        {"num-virtual-clients": 2, "num-users": 5, "num-examples": 1, "num-nonfinite": 0,
                         "num-clipped": 0, "train-loss-sum": 0.0, "update-norms": [0.0, 0.0]})
    _, metrics = s.aggregate_train(1, [lying])
    assert metrics["virtual-clients-rejected"] == 2 and metrics["virtual-clients-accepted"] == 0


@pytest.mark.parametrize("clipped", [-1, 3, 1.5])
def test_a_reply_with_an_impossible_clipped_count_is_rejected(flower_identity, clipped):
    """The clipped count feeds adaptive clipping's DP query: a value outside 0..count would move it
    by more than its sensitivity."""
    s = make_strategy(clip=1.0)
    msgs = assign(s, [2])
    bad = train_reply(msgs[0], {"a": torch.zeros(2, 2), "b": torch.zeros(3)},
                      {"num-virtual-clients": 2, "num-users": 2, "num-examples": 1, "num-nonfinite": 0,
                       "num-clipped": clipped, "train-loss-sum": 0.0, "update-norms": [0.0, 0.0]})
    _, metrics = s.aggregate_train(1, [bad])
    assert metrics["virtual-clients-rejected"] == 2


@pytest.mark.parametrize("failed,accepted,rejected", [(1, 1, 0), (-1, 0, 2), (3, 0, 2), (0.5, 0, 2)])
def test_failed_virtual_clients_are_counted_and_impossible_counts_rejected(flower_identity, failed, accepted,
                                                                           rejected):
    s = make_strategy(clip=1.0)
    msgs = assign(s, [2])
    partly = train_reply(msgs[0], {"a": torch.zeros(2, 2), "b": torch.zeros(3)},
                         {"num-virtual-clients": 2, "num-users": 2, "num-examples": 1, "num-nonfinite": 0,
                          "num-clipped": 0, "num-failed": failed, "train-loss-sum": 0.0, "update-norms": [0.0]})
    _, metrics = s.aggregate_train(1, [partly])
    assert metrics["virtual-clients-accepted"] == accepted and metrics["virtual-clients-rejected"] == rejected
    assert metrics["virtual-clients-failed"] == (failed if not rejected else 0)


def test_replies_are_summed_in_node_order_whatever_order_they_arrive_in(flower_identity):
    """Float addition is not associative: a fixed order keeps seeded (and resumed) runs bit-identical."""
    values = [0.1, 1e-8, 0.3, 7e-9]
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        s = make_strategy(slots=4)
        msgs = assign(s, [1, 1, 1, 1])
        replies = [reply(msgs[n], values[n], values[n], 1) for n in order]
        arrays, _ = s.aggregate_train(1, replies)
        results.append(new_state(arrays)["a"])
    assert all(torch.equal(results[0], r) for r in results)


def test_the_round_is_in_the_ledger_before_any_message_is_sent(tmp_path, flower_identity):
    """A crash between sending and aggregating must leave the ledger counting the round."""
    import json

    from simulations.inprocess import InProcessGrid
    from tests.test_budget_properties import zero_update_client

    seen = []

    def client(msg, context):
        ledger = json.loads((tmp_path / "privacy.json").read_text())
        seen.append((msg.content["config"]["server-round"], ledger["releases"]))
        return zero_update_client(msg, context)

    s = make_strategy(noise_std=1.0, clip=1.0, state={"w": torch.zeros(4)})
    s.ledger = PrivacyLedger(tmp_path / "privacy.json", 1e-5)
    s.start(InProcessGrid(client, 1), ArrayRecord({"w": torch.zeros(4)}), num_rounds=3)
    assert seen and all(releases == server_round for server_round, releases in seen)


def test_wrong_dtype_and_missing_tensors_are_rejected(flower_identity):
    s = make_strategy(slots=4)
    msgs = assign(s, [1, 1])
    float64 = train_reply(msgs[0], {"a": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(3)},
                          {"num-virtual-clients": 1, "num-users": 1})
    missing = train_reply(msgs[1], {"a": torch.zeros(2, 2)}, {"num-virtual-clients": 1, "num-users": 1})
    _, metrics = s.aggregate_train(1, [float64, missing])
    assert metrics["virtual-clients-rejected"] == 2 and metrics["virtual-clients-accepted"] == 0


def test_a_mechanism_told_another_m_than_the_sampler_fills_is_refused():
    """Noise calibrated for M slots divided by another M is a privacy bug: the strategy refuses to start."""
    with pytest.raises(ValueError, match="divides by M = 5 but the sampler fills M = 4"):
        DPFedEmb(sampler=UserSampler(0, 0.5, 2, 4), user_ids=np.arange(8), task=ANY_TASK,
                 mechanism=gaussian(1.0, 1.0, 5), server_optimizer=ServerOptimizer(STATE, 1.0, 0.0),
                 ledger=PrivacyLedger(None, 1e-5))


@pytest.mark.parametrize("scale_server_step", [True, False])
def test_adaptive_clipping_scales_the_server_step_by_the_initial_over_the_rounds_clip_norm(
        flower_identity, scale_server_step):
    """The round clips to C = 0.4·e^{0.2·½} (C moved once); the step is lr·(C₀/C)·mean with the scaling,
    lr·mean as published; the released mean itself is the same either way."""
    from fedemb.privacy.adaptive_clipping import AdaptiveClipping
    c0 = 0.4
    plan = PrivacyPlan("rdp", 0.5, 0.0, 0.0, 1.0, 1e-5, 0.0)  # z = 0: the arithmetic without noise
    adaptive = AdaptiveClipping(c0, 0.5, 0.2, 1.0, scale_server_step)
    mech = SampledGaussian(plan, c0, GaussianNoise(0.0, seed=0), 1, adaptive)
    s = DPFedEmb(sampler=UserSampler(0, 0.5, 1, 1), user_ids=np.arange(8), task=ANY_TASK, mechanism=mech,
                 server_optimizer=ServerOptimizer(STATE, 1.0, 0.0), ledger=PrivacyLedger(None, 1e-5))
    adaptive.clip_norm = c = c0 * math.exp(0.1)
    msgs = assign(s, [1])
    arrays, metrics = s.aggregate_train(1, [reply(msgs[0], 0.1, 0.0, 1)])
    assert metrics["clip-norm"] == pytest.approx(c)
    assert torch.allclose(s.last_release["a"], torch.full((2, 2), 0.1))
    factor = c0 / c if scale_server_step else 1.0
    assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.1 * factor))


def test_fixed_clipping_and_no_privacy_leave_the_server_step_alone(flower_identity):
    for s in (make_strategy(clip=0.4, slots=1), make_strategy(clip=0.0, slots=1)):
        msgs = assign(s, [1])
        arrays, _ = s.aggregate_train(1, [reply(msgs[0], 0.1, 0.0, 1)])
        assert torch.allclose(new_state(arrays)["a"], torch.full((2, 2), -0.1))
