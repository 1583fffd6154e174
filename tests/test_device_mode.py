"""Device mode without processes: a device trains only its own file's user and clips on the device;
the server samples among the online devices (Flower's unsigned 64-bit node ids included), divides by
round(q x registered devices) whatever turns up, and maps the SuperLink's error reply for a lost node
back to that node. The same ClientApp as in simulation handles all of it."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict

from fedemb.config import load_config
from fedemb.deploy.device_data import device_population
from fedemb.errors import ConfigError, DataError
from fedemb.models.embedding_net import shared_state
from fedemb.privacy.clipping import global_norm
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.sampling import UserSampler, VirtualClient
from fedemb.protocol import METRICS, UPDATE, TrainAssignment, train_message
from fedemb.run_setup import prepare_run
from fedemb.training.client_task import make_task
from simulations.client_app import train as client_train
from strategies.device_sampling import assign_to_own_node, node_user_ids
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import ServerOptimizer
from tests.helpers import tiny_config
from tests.test_strategy_arithmetic import STATE, gaussian, reply

ANY_TASK = make_task(tiny_config(), num_classes=10, image_shape=(1, 8, 8), training_key=0)

BIG_NODE = (1 << 64) - 5  # Flower node ids are uint64: above int64's range


def device_config(*overrides):
    return tiny_config("deployment.devices=4", "sampling.users_per_client=1", "sampling.rate=0.5", *overrides)


def write_device_file(path, users=(7,), n=6, shape=(1, 8, 8), label=3):
    x = np.random.default_rng(0).random((n * len(users), *shape), dtype=np.float32)
    np.savez(path, x=x, y=label + np.arange(n * len(users)) % 2, user=np.repeat(users, n))
    return path


def test_a_device_reads_its_own_user_and_says_clearly_what_is_wrong(tmp_path):
    one = write_device_file(tmp_path / "one.npz")
    pop = device_population({"data-path": str(one)}, (1, 8, 8), 10)
    assert len(pop) == 6 and pop.user_ids.tolist() == [7] and pop.num_classes == 10
    several = write_device_file(tmp_path / "several.npz", users=(1, 2, 3))
    assert device_population({"data-path": str(several), "user": 2}, (1, 8, 8), 10).user_ids.tolist() == [2]
    cases = [({}, "--node-config"),
             ({"data-path": str(tmp_path / "nope.npz")}, "no such file"),
             ({"data-path": str(several)}, "holds 3 users"),
             ({"data-path": str(several), "user": 9}, "no examples of user 9"),
             ({"data-path": str(several), "user": "2"}, "integer user id")]
    for node_config, message in cases:
        with pytest.raises(DataError, match=message):
            device_population(node_config, (1, 8, 8), 10)
    with pytest.raises(DataError, match=r"images are \(1, 8, 8\), this run's model takes \(1, 28, 28\)"):
        device_population({"data-path": str(one)}, (1, 28, 28), 10)
    with pytest.raises(DataError, match="label 4 is outside this run's 3 classes"):
        device_population({"data-path": str(one)}, (1, 8, 8), 3)


def test_a_virtual_client_is_one_device():
    with pytest.raises(ConfigError, match="users_per_client must be 1"):
        tiny_config("deployment.devices=4", "sampling.users_per_client=2")
    with pytest.raises(ConfigError, match="min_devices"):
        tiny_config("deployment.devices=4", "sampling.users_per_client=1", "deployment.min_devices=5")


def test_the_clientapp_trains_the_device_data_clips_on_the_device_and_keeps_the_server_data_home(tmp_path, flower_identity):
    cfg = device_config("client.lr=0.5")
    setup = prepare_run(cfg)
    assert setup.population == 4 and setup.virtual_clients == 2  # round(0.5 x 4 registered devices)
    task = make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape, training_key=5)
    assert task.devices and task.data is None  # the server's data paths never go to devices
    state = shared_state(setup.net)
    msg = train_message(state, TrainAssignment(1, 0.01, task, [(0, (int(node_user_ids([BIG_NODE])[0]),))]), BIG_NODE)
    data = write_device_file(tmp_path / "me.npz", users=(42,), shape=setup.splits.train.image_shape)
    context = Context(run_id=1, node_id=BIG_NODE, node_config={"data-path": str(data)}, state=RecordDict(), run_config={})
    out = client_train(msg, context)
    metrics = out.content[METRICS]
    assert metrics["num-virtual-clients"] == 1 and metrics["num-users"] == 1 and metrics["num-examples"] > 0
    update = {k: torch.from_numpy(out.content[UPDATE][k].numpy()) for k in out.content[UPDATE].keys()}
    assert metrics["update-norms"][0] > 0.01 and global_norm(update) <= 0.01 * (1 + 1e-5)

    two = train_message(state, TrainAssignment(1, 0.01, task, [(0, (1,)), (1, (2,))]), BIG_NODE)
    with pytest.raises(DataError, match="one virtual client of one user"):
        client_train(two, context)
    with pytest.raises(DataError, match="--node-config"):  # a device started without its data
        client_train(msg, Context(run_id=1, node_id=BIG_NODE, node_config={}, state=RecordDict(), run_config={}))


class Nodes:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def device_strategy(rate=0.5, devices=4, seed=3):
    sampler = UserSampler(seed, rate, 1, max(1, round(rate * devices)))
    return DPFedEmb(sampler=sampler, user_ids=np.arange(0), task=ANY_TASK, mechanism=gaussian(0.0, 1.0, sampler.virtual_clients),
                    server_optimizer=ServerOptimizer(STATE, 1.0, 0.0), ledger=PrivacyLedger(None, 1e-5),
                    placement="devices", wait_s=0.1)


def test_the_server_samples_online_devices_poisson_each_trains_itself_and_the_denominator_stays(flower_identity):
    nodes = [11, 12, 13, BIG_NODE, (1 << 63) + 1, 2**40]
    s = device_strategy(rate=0.5, devices=4)
    seen = []
    for rnd in range(1, 41):
        msgs = list(s.configure_train(rnd, ArrayRecord(STATE), None, Nodes(nodes)))
        for m in msgs:
            a = s.assignments[m.metadata.dst_node_id]
            assert len(a.virtual_clients) == 1 and len(a.virtual_clients[0][1]) == 1
        seen.append({m.metadata.dst_node_id for m in msgs})
    assert set().union(*seen) == set(nodes)  # every online device gets drawn, huge ids included
    rate = np.mean([len(x) for x in seen]) / len(nodes)
    assert 0.35 < rate < 0.65  # Poisson at q = 0.5 over the online devices
    assert len({frozenset(x) for x in seen}) > 20  # a fresh draw each round: 40 draws of 64 subsets give ~30
    assert s.denominator == 2  # round(q x 4 registered), not what was online or drawn
    with pytest.raises(ValueError, match="one device"):
        assign_to_own_node([VirtualClient(0, (1, 2))])


def test_the_superlinks_error_for_a_lost_device_counts_as_that_devices_failure(flower_identity):
    s = device_strategy(rate=1.0, devices=2)
    msgs = list(s.configure_train(1, ArrayRecord(STATE), None, Nodes([5, BIG_NODE])))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # what pushing them does
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    lost = Message(Error(code=5, reason="node unavailable"), reply_to=by_node[BIG_NODE])
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers, not the node
    _, metrics = s.aggregate_train(1, [reply(by_node[5], 0.1, 0.0, 1), lost])
    assert metrics["virtual-clients-accepted"] == 1 and metrics["virtual-clients-failed"] == 1
    assert metrics["virtual-clients-rejected"] == 0 and metrics["denominator"] == 2.0
    assert metrics["devices-online"] == 2


def test_a_run_without_enough_devices_stops_and_says_why_without_publishing_how_many(tmp_path, flower_identity):
    import logging

    from fedemb.monitoring.private_log import private_log

    s = device_strategy()
    s.min_devices = 3
    events = []
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.getMessage())
    private_log.addHandler(handler)
    try:
        result = s.start(Nodes([1, 2]), ArrayRecord(STATE), num_rounds=2)
    finally:
        private_log.removeHandler(handler)
    # the public reason names the setting; how many devices were online is a statistic of the users
    assert s.rounds_completed == 0 and "too few devices online (deployment.min_devices)" in s.stop_reason
    assert "2" not in s.stop_reason.replace("round 1", "")
    assert any("only 2 of the 3 devices" in e for e in events)  # the operator still learns it, privately
    assert result.arrays is not None


def test_the_deploy_config_is_valid_and_one_device_per_user():
    cfg = load_config("simulations/configs/deploy.toml")
    assert cfg.deployment.devices == 3 and cfg.sampling.users_per_client == 1 and cfg.privacy.enabled


def test_without_amplification_the_server_enforces_participation_limits_per_device(flower_identity):
    """DP-FTRL on devices: the tree accountant is told at most one participation per device, and the
    server's sampler holds every node id to it, whatever is online."""
    from fedemb.privacy.sampling import LimitedParticipationSampler

    s = device_strategy()
    s.sampler = LimitedParticipationSampler(3, 0.5, 1, 2, min_separation=1, max_participations=1)
    nodes = [5, 6, 7, BIG_NODE]
    drawn = []
    for rnd in range(1, 5):
        drawn += [m.metadata.dst_node_id for m in s.configure_train(rnd, ArrayRecord(STATE), None, Nodes(nodes))]
    assert sorted(drawn) == sorted(nodes)  # each device exactly once over the run, then never again
