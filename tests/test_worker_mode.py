"""Worker mode and device mode are the same DP mechanism: only which node computes which part of the
clipped sum changes. Workers get balanced work; the data is memory-mapped, never copied per client."""

import numpy as np
import pytest
import torch

from fedemb.config import load_config
from fedemb.run_setup import STREAM_TRAINING_KEY, prepare_run
from fedemb.models.embedding_net import shared_state
from fedemb.privacy.keyed_random import keyed_seed, run_secret
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import VirtualClient, make_sampler
from fedemb.training.client_task import make_task
from flwr.app import ArrayRecord
from simulations.client_app import train
from simulations.inprocess import InProcessGrid
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import ServerOptimizer
from strategies.worker_assignment import assign_balanced
from tests.helpers import tiny_config


def clipped_sums(cfg, placement, nodes, rounds=2):
    setup = prepare_run(cfg)
    secret = run_secret(cfg.run.seed)  # as run_federated derives it
    sums = []

    class Capture:
        def on_run_start(self, strategy, n):
            self.strategy = strategy

        def on_round_end(self, *args):
            sums.append({k: v.clone() for k, v in self.strategy.last_clipped_sum.items()})

        def on_run_end(self, *args):
            pass

    noise = GaussianNoise(setup.privacy.noise_multiplier * cfg.privacy.clip_norm, secret)
    strategy = DPFedEmb(sampler=make_sampler(secret, cfg.sampling, setup.virtual_clients),
                        user_ids=setup.splits.train.user_ids,
                        task=make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape,
                                       keyed_seed(secret, STREAM_TRAINING_KEY)),
                        mechanism=make_mechanism(cfg, setup.privacy, noise, setup.virtual_clients),
                        server_optimizer=ServerOptimizer(shared_state(setup.net), 1.0, 0.9),
                        ledger=PrivacyLedger(None, setup.privacy.delta), eval_every=0, callbacks=[Capture()],
                        placement=placement, user_examples=setup.splits.train.examples_count)
    strategy.start(InProcessGrid(train, nodes), ArrayRecord(shared_state(setup.net)), num_rounds=rounds)
    return sums, strategy


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4])
def test_worker_mode_and_device_mode_give_the_same_pre_noise_aggregate(flower_identity, k):
    cfg = tiny_config(f"sampling.users_per_client={k}", "sampling.rate=0.3")
    workers, ws = clipped_sums(cfg, "balanced", nodes=2)
    devices, ds = clipped_sums(cfg, "by_slot", nodes=ds_nodes(cfg))
    assert len(ws.assignments) == 2 and len(ds.assignments) > 2
    for w, d in zip(workers, devices):
        for key in w:
            torch.testing.assert_close(w[key], d[key], rtol=1e-5, atol=1e-6)


def ds_nodes(cfg):
    return prepare_run(cfg).virtual_clients


def test_workers_get_balanced_work():
    vcs = [VirtualClient(i, (i,)) for i in range(40)]
    rng = np.random.default_rng(0)
    costs = list(rng.integers(1, 200, size=40).astype(float))
    plan = assign_balanced(vcs, costs, node_ids=[10, 11, 12, 13])
    loads = [sum(costs[vc.index] for vc in plan[n]) for n in (10, 11, 12, 13)]
    assert max(loads) - min(loads) <= max(costs)  # greedy longest-first: within one job of even
    assert sorted(vc.index for n in plan for vc in plan[n]) == list(range(40))
    assert all([vc.index for vc in plan[n]] == sorted(vc.index for vc in plan[n]) for n in plan)


def test_the_population_is_memory_mapped_and_sorted_by_user():
    splits = prepare_run(tiny_config()).splits
    train = splits.train
    assert isinstance(train.images, np.memmap)
    assert np.all(np.diff(np.asarray(train.users)) >= 0)
    for u in train.user_ids[:5]:
        assert np.all(train.users[train.examples_of(u)] == u)
    assert train.examples_per_user().sum() == len(train)


def test_a_train_message_carries_user_ids_and_the_model_never_the_data(flower_identity):
    from fedemb.protocol import TrainAssignment, train_message

    cfg = tiny_config()
    setup = prepare_run(cfg)
    task = make_task(cfg, 10, setup.splits.train.image_shape, 1)
    users = tuple(int(u) for u in setup.splits.train.user_ids[:8])
    msg = train_message(shared_state(setup.net), TrainAssignment(1, 1.0, task, [(0, users)]), 1)
    total_bytes = sum(len(a.data) for a in msg.content["arrays"].values())
    model_bytes = sum(v.numel() * 4 for v in shared_state(setup.net).values())
    assert total_bytes <= model_bytes + 128 * len(shared_state(setup.net))  # npy headers only
    config_bytes = len(str(dict(msg.content["config"])))
    assert config_bytes < 4000  # ids and settings, not images
