"""What leaves a client: exactly the clipped backbone + embedding update and counts. The local head,
the data and per-virtual-client deltas must never appear in a reply."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedemb.models.embedding_net import shared_state
from fedemb.privacy.clipping import global_norm
from fedemb.privacy.mechanisms import RoundMechanism
from fedemb.protocol import METRICS, UPDATE, TrainAssignment, train_message
from fedemb.run_setup import prepare_run
from fedemb.training.client_task import make_task, run_train_assignment
from simulations.client_app import train as client_train
from tests.helpers import tiny_config

ANY_TASK = make_task(tiny_config(), num_classes=10, image_shape=(1, 8, 8), training_key=0)


def setup_message(cfg, clip, users_per_vc=((0, 1, 2, 3), (4, 5, 6, 7))):
    setup = prepare_run(cfg)
    user_ids = setup.splits.train.user_ids
    vcs = [(i, tuple(int(user_ids[j]) for j in group)) for i, group in enumerate(users_per_vc)]
    task = make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape, training_key=5)
    state = shared_state(setup.net)
    return state, TrainAssignment(1, clip, task, vcs)


@pytest.mark.parametrize("head", ["client.head_init=random", "client.head_init=anchors"])
def test_reply_holds_only_the_clipped_shared_update_and_counts(flower_identity, head):
    cfg = tiny_config("client.lr=0.5", "client.head_lr_scale=100", head)
    state, assignment = setup_message(cfg, clip=0.01)
    msg = train_message(state, assignment, dst_node_id=3)
    reply = client_train(msg, Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={}))
    assert set(reply.content.keys()) == {UPDATE, METRICS}
    update, metrics = reply.content[UPDATE], reply.content[METRICS]
    assert isinstance(update, ArrayRecord) and isinstance(metrics, MetricRecord)
    # the head is not there, and nothing but the shared state is
    assert set(update.keys()) == set(state.keys())
    assert not any("head" in k for k in update.keys())
    for k, v in state.items():
        assert tuple(update[k].shape) == tuple(v.shape)
    assert metrics["num-virtual-clients"] == 2 and metrics["num-users"] == 8
    # no per-example or per-client arrays hide in the metrics: only scalars and the list of norms
    assert all(isinstance(v, (int, float)) for k, v in metrics.items() if k != "update-norms")
    # each virtual client was clipped to C before summing: the sum is within 2 x C
    total = {k: torch.from_numpy(update[k].numpy()) for k in update.keys()}
    assert all(n > 0.01 for n in metrics["update-norms"])  # lr 0.5 moves far more than C
    assert global_norm(total) <= 2 * 0.01 * (1 + 1e-5)


def test_every_virtual_client_is_clipped_separately():
    """Two virtual clients each clipped to C: even if they point the same way the sum stays <= 2C,
    and a single one never contributes more than C."""
    cfg = tiny_config("client.lr=0.5")
    state, assignment = setup_message(cfg, clip=0.05, users_per_vc=((0, 1, 2, 3),))
    total, metrics = run_train_assignment(state, assignment)
    assert global_norm(total) == pytest.approx(0.05, rel=1e-4)
    assert metrics["num-clipped"] == 1


def test_without_clipping_the_raw_delta_is_returned():
    cfg = tiny_config("privacy.enabled=false")
    state, assignment = setup_message(cfg, clip=0.0, users_per_vc=((0, 1, 2, 3),))
    total, metrics = run_train_assignment(state, assignment)
    assert global_norm(total) == pytest.approx(metrics["update-norms"][0], rel=1e-5)


def test_diverged_training_becomes_a_zero_update_and_is_counted():
    cfg = tiny_config("client.lr=1e30")
    state, assignment = setup_message(cfg, clip=1.0, users_per_vc=((0, 1, 2, 3),))
    total, metrics = run_train_assignment(state, assignment)
    assert metrics["num-nonfinite"] == 1 and metrics["num-virtual-clients"] == 1
    assert all(torch.count_nonzero(v) == 0 for v in total.values())
    assert metrics["train-loss-sum"] == 0.0  # a diverged client's NaN loss does not poison the round's mean loss


def test_local_training_is_deterministic_for_a_training_key():
    cfg = tiny_config()
    state, assignment = setup_message(cfg, clip=1.0)
    a, _ = run_train_assignment(state, assignment)
    b, _ = run_train_assignment(state, assignment)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fault_injection_fails_virtual_clients_or_poisons_the_reply():
    state, assignment = setup_message(tiny_config("simulation.faults.raise_rate=1.0"), clip=1.0)
    total, metrics = run_train_assignment(state, assignment)
    assert metrics["num-failed"] == 2 and metrics["num-virtual-clients"] == 2
    assert all(torch.count_nonzero(v) == 0 for v in total.values())
    state, assignment = setup_message(tiny_config("simulation.faults.nan_rate=1.0"), clip=1.0)
    total, _ = run_train_assignment(state, assignment)
    assert all(torch.isnan(v).all() for v in total.values())


def test_a_virtual_client_whose_training_raises_costs_only_itself(monkeypatch):
    import fedemb.training.vectorized as vectorized

    cfg = tiny_config()
    state, both = setup_message(cfg, clip=1.0)
    (_, broken_users), healthy = both.virtual_clients
    alone = TrainAssignment(both.server_round, both.clip_norm, both.task, [healthy])
    expected, _ = run_train_assignment(state, alone)
    real = vectorized.train_virtual_client

    def fails_for_one(net, pop, users, *args):
        if tuple(users) == tuple(broken_users):
            raise OSError("disk read error")
        return real(net, pop, users, *args)

    monkeypatch.setattr(vectorized, "train_virtual_client", fails_for_one)
    total, metrics = run_train_assignment(state, both)
    assert metrics["num-failed"] == 1 and metrics["num-virtual-clients"] == 2
    assert all(torch.equal(total[k], expected[k]) for k in expected)
    assert len(metrics["update-norms"]) == 1


def test_local_head_spans_only_the_classes_present():
    from fedemb.training.local import LocalTrainingConfig, make_head

    cfg = LocalTrainingConfig(epochs=1, batch_size=8, max_examples=100, lr=0.1, num_classes=10)
    head, targets = make_head(16, np.array([7, 3, 7, 9]), cfg)
    assert head.out_features == 3 and head.bias is None
    assert targets.tolist() == [1, 0, 1, 2]
    cfg.head = "global"
    head, targets = make_head(16, np.array([7, 3]), cfg)
    assert head.out_features == 10 and targets.tolist() == [7, 3]


def test_head_warmup_trains_only_the_head_first():
    from fedemb.data.store import load_splits
    from fedemb.training.local import LocalTrainingConfig, train_virtual_client

    cfg = tiny_config()
    setup = prepare_run(cfg)
    pop = load_splits(cfg.data).train
    users = pop.user_ids[:4]
    local = LocalTrainingConfig(epochs=1, batch_size=4, max_examples=16, lr=0.1, head_lr_scale=10.0, head_warmup_steps=100, num_classes=10)
    result = train_virtual_client(setup.net, pop, users, local, seed=1)
    assert all(torch.count_nonzero(v) == 0 for v in result.delta.values())  # all steps were warm-up
    local.head_warmup_steps = 1
    result = train_virtual_client(setup.net, pop, users, local, seed=1)
    assert any(torch.count_nonzero(v) > 0 for v in result.delta.values())


def test_class_anchors_are_unit_rows_fixed_by_the_seed():
    from fedemb.training.local import class_anchors

    a = class_anchors(10, 16, seed=7)
    assert a.shape == (10, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(10))
    assert torch.equal(a, class_anchors(10, 16, seed=7))
    assert not torch.allclose(a, class_anchors(10, 16, seed=8))


def test_anchor_heads_start_from_the_rows_of_their_classes():
    from fedemb.training.local import LocalTrainingConfig, class_anchors, make_head

    anchors = class_anchors(10, 16, seed=1)
    cfg = LocalTrainingConfig(epochs=1, batch_size=8, max_examples=100, lr=0.1, num_classes=10, head_init="anchors")
    head, targets = make_head(16, np.array([7, 3, 7, 9]), cfg, anchors)
    assert torch.equal(head.weight.detach(), anchors[[3, 7, 9]]) and targets.tolist() == [1, 0, 1, 2]
    cfg.head = "global"
    head, _ = make_head(16, np.array([7, 3]), cfg, anchors)
    assert torch.equal(head.weight.detach(), anchors)


def test_anchor_heads_are_the_same_for_every_virtual_client_and_round(monkeypatch):
    """Anchors come from the run's training key alone: two virtual clients in different rounds start
    from the same head, and changing the key changes it."""
    import fedemb.training.vectorized as vectorized

    seen = []
    real = vectorized.train_virtual_client
    monkeypatch.setattr(vectorized, "train_virtual_client",
                        lambda *args: seen.append(args[-1].clone()) or real(*args))
    cfg = tiny_config("client.head=global", "client.head_init=anchors")
    state, assignment = setup_message(cfg, clip=1.0)
    run_train_assignment(state, assignment)
    assignment.server_round = 2
    run_train_assignment(state, assignment)
    assert len(seen) == 4 and all(torch.equal(seen[0], a) for a in seen)
    assignment.task = assignment.task.model_copy(update={"training_key": 6})
    run_train_assignment(state, assignment)
    assert not torch.equal(seen[0], seen[-1])


def test_the_dp_fedavg_baseline_sends_its_shared_classifier_clipped_with_everything_else(flower_identity):
    """client.head = "shared" (no partial aggregation): the classifier over all classes is part of the
    model; it is trained from the server's copy and travels inside the one clipped update."""
    cfg = tiny_config("client.lr=0.5", "client.head=shared", "client.head_init=random")
    state, assignment = setup_message(cfg, clip=0.01, users_per_vc=((0, 1, 2, 3),))
    num_classes = assignment.task.num_classes
    assert state["classifier.weight"].shape == (num_classes, cfg.model.embedding_dim)
    total, metrics = run_train_assignment(state, assignment)
    assert set(total) == set(state)
    assert total["classifier.weight"].abs().sum() > 0  # the head moved and its change is sent
    assert global_norm(total) <= 0.01 * (1 + 1e-5)  # clipped together with the backbone and embedding
    with pytest.raises(Exception, match="head_init must be 'random'"):
        tiny_config("client.head=shared", "client.head_init=anchors")


class ClipOnly(RoundMechanism):
    """A mechanism that clips to C and adds no noise, so the aggregate shows exactly what was accepted."""
    name = "clip only"
    clip_norm = 0.01

    def privatize(self, total, *scalars):
        return {k: v.clone() for k, v in total.items()}

    def round_metrics(self):
        return {}


def server_for(state, assignment, node):
    from fedemb.privacy.ledger import PrivacyLedger
    from fedemb.privacy.sampling import UserSampler
    from strategies.dp_fedemb import DPFedEmb
    from strategies.server_optimizer import ServerOptimizer

    strategy = DPFedEmb(sampler=UserSampler(0, 0.5, 4, 1), user_ids=np.arange(8), task=ANY_TASK, mechanism=ClipOnly(),
                        server_optimizer=ServerOptimizer(state, 1.0, 0.0), ledger=PrivacyLedger(None, 1e-5))
    strategy.assignments = {node: assignment}
    return strategy


def device_reply(cfg, scale):
    """A device's real reply for one virtual client clipped to C = 0.01, its update then scaled by
    `scale` (what float rounding, or a broken clipping, on the device would send)."""
    state, assignment = setup_message(cfg, clip=0.01, users_per_vc=((0, 1, 2, 3),))
    reply = client_train(train_message(state, assignment, dst_node_id=3),
                         Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={}))
    sent = {k: torch.from_numpy(reply.content[UPDATE][k].numpy()) * scale for k in reply.content[UPDATE].keys()}
    reply.content[UPDATE] = ArrayRecord(sent)
    return state, assignment, reply, global_norm(sent)


def test_a_reply_over_count_times_c_by_rounding_is_projected_onto_the_ball_and_counted(flower_identity, caplog):
    """The accountant is told sensitivity C: what enters the sum must be at most count x C, not
    count x C x (1 + slack). A reply just over it (float rounding on a device) is scaled back onto the
    ball, counted in the round's replies-projected, and still used."""
    state, assignment, reply, norm = device_reply(tiny_config("client.lr=0.5"), 1 + 1e-5)
    assert 0.01 < norm <= 0.01 * (1 + 2e-5)
    server = server_for(state, assignment, 3)
    from fedemb.monitoring.private_log import private_log

    private_log.addHandler(caplog.handler)  # the private log never propagates to the root logger caplog hooks
    try:
        _, metrics = server.aggregate_train(1, [reply])
    finally:
        private_log.removeHandler(caplog.handler)
    assert metrics["replies-projected"] == 1 and "node 3: update norm" in caplog.text
    assert metrics["virtual-clients-accepted"] == 1 and metrics["virtual-clients-rejected"] == 0
    summed = global_norm(server.last_clipped_sum)
    assert summed <= 0.01 and summed == pytest.approx(0.01, rel=1e-6)  # on the sphere, not inside it

    state, assignment, reply, norm = device_reply(tiny_config("client.lr=0.5"), 1.0 - 1e-3)
    server = server_for(state, assignment, 3)
    _, metrics = server.aggregate_train(1, [reply])  # within the bound: untouched
    assert metrics["replies-projected"] == 0 and global_norm(server.last_clipped_sum) == pytest.approx(norm, rel=1e-9)


def test_a_reply_over_count_times_c_beyond_rounding_is_rejected_not_projected(flower_identity):
    """2% over C is no rounding error: the device did not clip as told; its reply is left out."""
    state, assignment, reply, _ = device_reply(tiny_config("client.lr=0.5"), 1.02)
    server = server_for(state, assignment, 3)
    _, metrics = server.aggregate_train(1, [reply])
    assert metrics["virtual-clients-rejected"] == 1 and metrics["replies-projected"] == 0
    assert all(torch.count_nonzero(v) == 0 for v in server.last_clipped_sum.values())
