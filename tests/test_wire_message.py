"""The train message is typed and versioned: what the server sends is what the node reads, and a node
refuses, in one line, a message of another wire version or a task that does not validate."""

import json

import pytest
import torch
from flwr.app import ConfigRecord

from fedemb.errors import ConfigError
from fedemb.protocol import CONFIG, WIRE_VERSION, ProtocolError, TrainAssignment, read_train_message, train_message
from fedemb.training.client_task import make_task
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("flower_identity")  # messages are built as inside a Flower run

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def message(*overrides):
    task = make_task(tiny_config(*overrides), num_classes=10, image_shape=(1, 8, 8), training_key=7)
    return train_message(STATE, TrainAssignment(3, 0.5, task, [(0, (4, 5)), (2, (9,))]), dst_node_id=1), task


def with_config(msg, **changes):
    record = dict(msg.content[CONFIG])
    record.update(changes)
    msg.content[CONFIG] = ConfigRecord(record)
    return msg


def test_the_node_reads_exactly_what_the_server_sent():
    msg, task = message("client.head=\"global\"", "simulation.faults.nan_rate=0.25")
    state, assignment = read_train_message(msg)
    assert torch.equal(state["w"], STATE["w"])
    assert assignment == TrainAssignment(3, 0.5, task, [(0, (4, 5)), (2, (9,))])
    assert assignment.task.client.head == "global" and assignment.task.faults.nan_rate == 0.25
    assert assignment.task.image_shape == (1, 8, 8)


def test_weight_files_and_on_devices_the_data_config_stay_on_the_server():
    _, task = message('model.init_checkpoint="/srv/private/init.pt"')
    assert task.model.init_checkpoint == "" and task.data is not None
    _, on_devices = message("deployment.devices=4", "sampling.users_per_client=1")
    assert on_devices.devices and on_devices.data is None


@pytest.mark.parametrize("version", [WIRE_VERSION + 1, None])
def test_a_message_of_another_wire_version_is_refused_in_one_line(version):
    msg, _ = message()
    record = dict(msg.content[CONFIG])
    if version is None:
        del record["wire-version"]
    else:
        record["wire-version"] = version
    msg.content[CONFIG] = ConfigRecord(record)
    with pytest.raises(ProtocolError, match=f"wire version {version}, this node speaks {WIRE_VERSION}"):
        read_train_message(msg)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t | {"surprise": 1}, "surprise"),
    (lambda t: t | {"num_classes": "ten"}, "num_classes"),
    (lambda t: t | {"client": t["client"] | {"lr": -1}}, "client.lr"),
])
def test_a_task_that_does_not_validate_is_refused_naming_the_key(edit, key):
    msg, _ = message()
    task = json.loads(msg.content[CONFIG]["task"])
    with pytest.raises(ConfigError) as exc:
        read_train_message(with_config(msg, task=json.dumps(edit(task))))
    assert str(exc.value).startswith("train message task: ") and key in str(exc.value) and "\n" not in str(exc.value)
