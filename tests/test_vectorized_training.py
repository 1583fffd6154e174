"""Training several virtual clients at once gives what training them one by one gives (same seeds),
including ragged data, local heads of different widths and head warm-up, in both formulations (stacked
weights through plain autograd, and vmap); a model the stacked formulation cannot run falls back to vmap,
and one vmap cannot batch either falls back to sequential training, each saying so."""

import logging

import pytest
import torch

from fedemb.run_setup import prepare_run
from fedemb.training.local import LocalTrainingConfig, class_anchors, train_virtual_client
from fedemb.training.stacked import unsupported
from fedemb.training.vectorized import train_virtual_clients
from tests.helpers import tiny_config


def setup(*overrides):
    cfg = tiny_config(*overrides)
    s = prepare_run(cfg)
    return s.net, s.splits.train


def local_config(**kw):
    base = dict(epochs=2, batch_size=4, max_examples=30, lr=0.05, momentum=0.9, head_lr_scale=10.0,
                head_warmup_steps=0, head="local", head_logits="dot", num_classes=10)
    return LocalTrainingConfig(**(base | kw))


def update_tolerance(cfg, expected: torch.Tensor) -> dict:
    """Float rounding. With the cosine head the first convolution's weight gradient is a sum with heavy
    cancellation, and one thread's convolution kernel rounds it differently from the batched one (up to
    ~3e-3 of the tensor's largest entry, both vectorized formulations alike, every other tensor within
    1e-6): the bound follows the tensor's scale there."""
    if cfg.head_logits == "cosine":
        return {"rtol": 1e-4, "atol": 5e-3 * float(expected.abs().max())}
    return {"rtol": 1e-4, "atol": 1e-6}


def one_by_one(net, pop, clients, cfg, seeds, anchors):
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    out = []
    for users, seed in zip(clients, seeds):
        net.load_state_dict(initial)
        out.append(train_virtual_client(net, pop, users, cfg, seed, anchors))
    net.load_state_dict(initial)
    return out


@pytest.mark.parametrize("formulation", ["stacked", "vmap"])
@pytest.mark.parametrize("kw", [{}, {"head": "global"}, {"head_warmup_steps": 3}, {"head": "global", "head_init": "anchors"},
                                {"max_examples": 7, "batch_size": 3},
                                {"head": "global", "head_init": "anchors", "head_logits": "cosine", "head_scale": 8.0},
                                {"head_logits": "cosine"}])
def test_vectorized_equals_one_by_one(kw, formulation):
    net, pop = setup()
    cfg = local_config(**kw)
    users = pop.user_ids
    # ragged on purpose: 1, 2, 3, 5 users per client; and an empty one
    clients = [tuple(users[:1]), tuple(users[1:3]), tuple(users[3:6]), tuple(users[6:11]), (10**9,)]
    seeds = [11, 12, 13, 14, 15]
    anchors = class_anchors(10, net.embedding.out_features, 3) if cfg.head_init == "anchors" else None
    expected = one_by_one(net, pop, clients, cfg, seeds, anchors)
    got = list(train_virtual_clients(net, pop, clients, cfg, seeds, anchors, group_size=8,
                                     formulations=(formulation,)))
    assert [r.num_examples for r in got] == [r.num_examples for r in expected]
    assert expected[-1].num_examples == 0
    for e, g in zip(expected, got):
        assert g.mean_loss == pytest.approx(e.mean_loss, rel=1e-4, abs=1e-6)
        for k in e.delta:
            torch.testing.assert_close(g.delta[k], e.delta[k], **update_tolerance(cfg, e.delta[k]))
    assert any(e.delta[k].abs().max() > 1e-3 for e in expected for k in e.delta)  # they did train


def test_groups_smaller_than_the_clients_give_the_same_results():
    net, pop = setup()
    cfg = local_config()
    clients = [tuple(pop.user_ids[i:i + 2]) for i in range(0, 14, 2)]
    seeds = list(range(7))
    a = list(train_virtual_clients(net, pop, clients, cfg, seeds, None, group_size=3))
    b = list(train_virtual_clients(net, pop, clients, cfg, seeds, None, group_size=7))
    for x, y in zip(a, b):
        for k in x.delta:
            torch.testing.assert_close(x.delta[k], y.delta[k], rtol=1e-4, atol=1e-6)


def test_a_model_vmap_cannot_batch_falls_back_with_a_log_line(caplog):
    net, pop = setup('model.norm="keep"', 'model.name="resnet10t"', "privacy.enabled=false")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    cfg = local_config(epochs=1, max_examples=4, batch_size=4)
    clients = [tuple(pop.user_ids[:1]), tuple(pop.user_ids[1:2])]
    with caplog.at_level(logging.WARNING, logger="fedemb"):
        got = list(train_virtual_clients(net, pop, clients, cfg, [1, 2], None, group_size=4, model_key="bn-model"))
    assert "vectorized training is not possible" in caplog.text
    expected = one_by_one(net, pop, clients, cfg, [1, 2], None)
    for e, g in zip(expected, got):
        for k in e.delta:
            torch.testing.assert_close(g.delta[k], e.delta[k])


def test_vectorized_groups_are_capped_to_a_memory_budget():
    from fedemb.training.vectorized import group_size_within_memory

    assert group_size_within_memory(104_000, 50) == 50  # a LeNet: all 50 fit in 1 GiB
    assert group_size_within_memory(11_200_000, 50) == 5  # resnet18: 16 bytes x 11.2M per client
    assert group_size_within_memory(10**9, 50) == 1  # too big for any group: one by one


def assert_same_results(got, expected):
    assert [r.num_examples for r in got] == [r.num_examples for r in expected]
    for e, g in zip(expected, got):
        assert g.mean_loss == pytest.approx(e.mean_loss, rel=1e-4, abs=1e-6)
        for k in e.delta:
            assert g.delta[k].device.type == "cpu"
            torch.testing.assert_close(g.delta[k], e.delta[k], rtol=1e-4, atol=1e-6)


def test_a_timm_resnet_with_group_norm_trains_stacked_as_it_trains_one_by_one(caplog):
    net, pop = setup('model.name="resnet10t"', 'model.norm="group"', "privacy.enabled=false")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert unsupported(net) == ""
    cfg = local_config(epochs=1, max_examples=6, batch_size=3)
    clients = [tuple(pop.user_ids[i:i + 1]) for i in range(3)]
    expected = one_by_one(net, pop, clients, cfg, [1, 2, 3], None)
    with caplog.at_level(logging.INFO, logger="fedemb"):
        got = list(train_virtual_clients(net, pop, clients, cfg, [1, 2, 3], None, group_size=3,
                                         model_key="resnet10t-gn", formulations=("stacked",)))
    assert "cannot run this model stacked" not in caplog.text and "not possible" not in caplog.text
    assert_same_results(got, expected)


class Scale(torch.nn.Module):
    """A module with a parameter of its own and no stacked forward: vmap batches it, stacking cannot."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.s


class SharedWeightConv(torch.nn.Module):
    """Runs another module's weight itself instead of calling that module: stacked weights must not reach
    it as one client's."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


@pytest.mark.parametrize("change, reason", [
    (lambda net: torch.nn.Sequential(Scale(), net.backbone), "has no stacked forward"),
    (lambda net: torch.nn.Sequential(SharedWeightConv(torch.nn.Conv2d(1, 1, 3)), net.backbone), "stacked"),
    (lambda net: torch.nn.Sequential(torch.nn.Dropout(0.2), net.backbone), "draws random numbers"),
])
def test_a_model_the_stacked_formulation_cannot_run_falls_back_with_the_same_results(change, reason, caplog):
    net, pop = setup()
    net.backbone = change(net)
    cfg = local_config(epochs=1, max_examples=8, batch_size=4)
    clients = [tuple(pop.user_ids[i:i + 2]) for i in range(0, 6, 2)]
    seeds = [4, 5, 6]
    expected = one_by_one(net, pop, clients, cfg, seeds, None)
    with caplog.at_level(logging.INFO, logger="fedemb"):
        got = list(train_virtual_clients(net, pop, clients, cfg, seeds, None, group_size=3))
    assert "cannot run this model stacked" in caplog.text and reason in caplog.text
    assert_same_results(got, expected)
