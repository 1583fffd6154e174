"""What crosses the wire between the DP-FedEmb strategy and the ClientApp, in Flower records.

Train message (server -> node), one per node per round:
  "arrays"  ArrayRecord   the shared model (backbone + embedding), nothing else
  "config"  ConfigRecord  the wire version, round, clipping, the task (TrainTask as JSON), and the virtual
                          clients to train, flattened: vc-index[i] trains users vc-users[vc-offsets[i]:vc-offsets[i+1]]
Reply (node -> server):
  "update"  ArrayRecord   the SUM of the clipped updates of the virtual clients it trained
  "metrics" MetricRecord  how many virtual clients that sum covers, and training statistics
Nothing else leaves a client: the classification head, the data and the per-client deltas stay there.
A simulated node fault (simulation.faults.node_*) replies at once with only:
  "simulated-fault" ConfigRecord  {"kind": "node-timeout" | "node-drop"}: the server takes this reply as
                                  arrived after the round's deadline (discarded, its node missing)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from pydantic import Field

from fedemb.config import ClientConfig, DataConfig, FaultConfig, ModelConfig
from fedemb.errors import FedembError
from fedemb.typed_config import Settings, parse_json

WIRE_VERSION = 3  # raise it whenever TrainTask or the records change meaning; a node refuses any other

ARRAYS = "arrays"
CONFIG = "config"
UPDATE = "update"
METRICS = "metrics"
SIMULATED_FAULT = "simulated-fault"

NUM_VIRTUAL_CLIENTS = "num-virtual-clients"
NUM_USERS = "num-users"
NUM_EXAMPLES = "num-examples"
NUM_NONFINITE = "num-nonfinite"
NUM_CLIPPED = "num-clipped"
NUM_FAILED = "num-failed"  # virtual clients whose training raised: they add nothing
NUM_TIMED_OUT = "num-timed-out"  # virtual clients that replied after the deadline (simulated): they add nothing
NUM_DROPPED = "num-dropped"  # virtual clients that went silent (simulated): they add nothing
LOST_COUNTS = (NUM_FAILED, NUM_TIMED_OUT, NUM_DROPPED)  # counted in a reply, left out of its sum
LOSS_SUM = "train-loss-sum"
BOUNDED_LOSS_SUM = "bounded-loss-sum"  # Σ over the virtual clients of min(max(mean loss, 0), B); non-finite: B
UPDATE_NORMS = "update-norms"


class ProtocolError(FedembError):
    """A train message this node cannot read: another wire version, or a task that does not validate."""


class TrainTask(Settings):
    """The static part of every train message: enough for any node to rebuild data, model and training."""

    devices: bool  # a deployment: each node trains on its own data, so `data` stays None
    data: DataConfig | None
    model: ModelConfig  # without weight files: the weights come in the message
    client: ClientConfig
    num_classes: int = Field(ge=1)
    image_shape: tuple[int, int, int]
    dp: bool
    training_key: int  # the key of the clients' training draws; says nothing about sampling or noise
    faults: FaultConfig
    loss_bound: float = Field(ge=0)  # B of the DP training loss (privacy.metrics)
    threads: int = Field(ge=1)


@dataclass
class TrainAssignment:
    server_round: int
    clip_norm: float  # 0: no clipping (non-private training)
    task: TrainTask
    virtual_clients: list[tuple[int, tuple[int, ...]]]  # (slot index, user ids)

    @property
    def num_users(self) -> int:
        return sum(len(users) for _, users in self.virtual_clients)


def train_message(state: dict[str, torch.Tensor], assignment: TrainAssignment, dst_node_id: int) -> Message:
    offsets = np.cumsum([0] + [len(u) for _, u in assignment.virtual_clients]).tolist()
    config = ConfigRecord({
        "wire-version": WIRE_VERSION,
        "server-round": assignment.server_round,
        "clip-norm": float(assignment.clip_norm),
        "task": assignment.task.model_dump_json(),
        "vc-index": [int(i) for i, _ in assignment.virtual_clients],
        "vc-offsets": [int(o) for o in offsets],
        "vc-users": [int(u) for _, users in assignment.virtual_clients for u in users],
    })
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: config})
    return Message(content=content, dst_node_id=dst_node_id, message_type=MessageType.TRAIN)


def read_train_message(msg: Message) -> tuple[dict[str, torch.Tensor], TrainAssignment]:
    config = msg.content[CONFIG]
    version = config.get("wire-version") if "wire-version" in config else None
    if version != WIRE_VERSION:
        raise ProtocolError(f"the train message speaks wire version {version}, this node speaks {WIRE_VERSION}: "
                            "run the same fedemb version on the server and the nodes")
    task = parse_json(TrainTask, str(config["task"]), "train message task")
    offsets = list(config["vc-offsets"])
    users = list(config["vc-users"])
    vcs = [(int(i), tuple(int(u) for u in users[offsets[j]:offsets[j + 1]]))
           for j, i in enumerate(config["vc-index"])]
    assignment = TrainAssignment(int(config["server-round"]), float(config["clip-norm"]), task, vcs)
    return msg.content[ARRAYS].to_torch_state_dict(), assignment


def train_reply(msg: Message, update_sum: dict[str, torch.Tensor], metrics: dict) -> Message:
    content = RecordDict({UPDATE: ArrayRecord(update_sum), METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def simulated_fault_reply(msg: Message, kind: str) -> Message:
    """The immediate stand-in for a reply that a simulated node fault makes late or lost."""
    return Message(content=RecordDict({SIMULATED_FAULT: ConfigRecord({"kind": kind})}), reply_to=msg)


def simulated_fault(reply: Message) -> str | None:
    """The kind of simulated node fault a reply stands for, or None for any other reply."""
    if reply.has_error() or set(reply.content.keys()) != {SIMULATED_FAULT}:
        return None
    record = reply.content[SIMULATED_FAULT]
    return str(record.get("kind", "")) if isinstance(record, ConfigRecord) else None
