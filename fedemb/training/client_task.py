"""What a node does with a train message: train each named virtual client, clip each Δ, reply the sum.

Each virtual client's Δ is clipped here, on the node that trained it, before anything is summed or
sent. A non-finite Δ (diverged training) becomes zero and is counted; it still counts as one virtual
client, so the server's norm bound (count x C) stays right. A virtual client whose training raises
adds nothing and is counted as failed; the node's other virtual clients are kept.

The node's own draws (training seeds, head anchors, injected faults) are keyed by the task's training
key, a PRF output of the server's secret under its own label, and by the virtual client's index: its
slot, or on a device its own id, so nothing a device draws or receives depends on other devices.

Fault injection (simulation.faults, fedemb.training.faults): a virtual client's training raises, its
update is NaN (which poisons the node's sum), its reply would come after the deadline (timeout) or it
goes silent (drop). Raised, timed-out and dropped virtual clients are left out of the sum and counted
in the reply, each kind on its own; none of them trains or waits. Node faults are the ClientApp's
(simulated_node_fault): the node replies at once with a marker instead of training.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import torch

from fedemb.config import ModelConfig
from fedemb.data.population import Population
from fedemb.data.store import load_splits
from fedemb.errors import ConfigError, DataError
from fedemb.models.embedding_net import EmbeddingNet, build_embedding_net
from fedemb.privacy.clipping import clip_to_norm, global_norm, is_finite
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.streams import STREAM_HEAD_ANCHORS, STREAM_TRAINING
from fedemb.protocol import (BOUNDED_LOSS_SUM, LOSS_SUM, NUM_CLIPPED, NUM_DROPPED, NUM_EXAMPLES, NUM_FAILED,
                             NUM_NONFINITE, NUM_TIMED_OUT, NUM_USERS, NUM_VIRTUAL_CLIENTS, UPDATE_NORMS,
                             TrainAssignment, TrainTask)
from fedemb.training.faults import node_fault, virtual_client_fault
from fedemb.training.local import LocalResult, LocalTrainingConfig, class_anchors
from fedemb.training.vectorized import train_virtual_clients


log = logging.getLogger("fedemb")


# injected faults that leave a virtual client out of its node's sum -> the reply's count of them
_LOST = {"raise": NUM_FAILED, "timeout": NUM_TIMED_OUT, "drop": NUM_DROPPED}


def make_task(cfg, num_classes: int, image_shape, training_key: int) -> TrainTask:
    """The static part of every train message. On devices each node trains on its own data, so the
    server's data config stays home; weight files stay home too (the weights come in the message)."""
    on_devices = cfg.deployment.devices > 0
    return TrainTask(
        devices=on_devices,
        data=None if on_devices else cfg.data,
        model=cfg.model.model_copy(update={"init_checkpoint": "", "pretrained_file": ""}),
        client=cfg.client,
        num_classes=int(num_classes),
        image_shape=tuple(int(s) for s in image_shape),
        dp=bool(cfg.privacy.enabled),
        training_key=int(training_key),
        faults=cfg.simulation.faults,
        loss_bound=float(cfg.privacy.metrics.loss_bound),
        threads=max(1, int(cfg.simulation.cpus_per_client)),
    )


@lru_cache(maxsize=2)
def _model_for(model_json: str, image_shape: tuple[int, ...], dp: bool, shared_classes: int,
               device: str = "cpu") -> EmbeddingNet:
    net = build_embedding_net(ModelConfig(**json.loads(model_json)), image_shape, dp, shared_classes)
    return net.to(device)


def training_device(choice: str) -> str:
    """client.device on this node: "cuda" or "cpu"."""
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise ConfigError("client.device = 'cuda' but this node has no CUDA device it may use (in Ray simulation "
                        "set simulation.gpus_per_client > 0)")
    return "cpu"


CraftedUpdate = Callable[[tuple[int, ...]], "dict[str, torch.Tensor] | None"]


def run_train_assignment(state: dict[str, torch.Tensor], assignment: TrainAssignment,
                         crafted: CraftedUpdate | None = None, device: Population | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """`crafted(user_ids)` may return the update a virtual client sends instead of training (the
    privacy audit's canary users); it is clipped and summed like any other. `device`: the one user's
    data this node holds (a deployment), trained as the one virtual client the server assigned."""
    task = assignment.task
    torch.set_num_threads(task.threads)
    if device is not None:
        assignment = own_virtual_client(assignment, device)
        pop = device
    else:
        if task.data is None:
            raise DataError("this train message is for a device (its data stays on the device), but no device data was given")
        pop = load_splits(task.data).train
    shared_classes = task.num_classes if task.client.head == "shared" else 0
    model_key = json.dumps(task.model.model_dump(), sort_keys=True)
    net = _model_for(model_key, task.image_shape, task.dp, shared_classes, training_device(task.client.device))
    local_cfg = LocalTrainingConfig(**task.client.model_dump(), num_classes=task.num_classes)
    faults = task.faults
    key = task.training_key
    anchors = (class_anchors(local_cfg.num_classes, net.embedding.out_features, keyed_seed(key, STREAM_HEAD_ANCHORS))
               if local_cfg.head_init == "anchors" else None)
    plan = []
    for vc_index, user_ids in assignment.virtual_clients:
        fault = virtual_client_fault(faults, key, assignment.server_round, vc_index)
        override = crafted(user_ids) if crafted else None
        if fault == "raise" and override is not None:  # a crafted update (the audit's canary) is not trained
            fault = None
        plan.append((vc_index, user_ids, fault, override))
    to_train = [(users, keyed_seed(key, assignment.server_round, vc, STREAM_TRAINING))
                for vc, users, fault, override in plan if override is None and fault not in _LOST]
    net.load_state_dict(state, strict=False)
    trained = iter(train_virtual_clients(net, pop, [u for u, _ in to_train], local_cfg, [s for _, s in to_train],
                                         anchors, local_cfg.vectorize, model_key))
    total = {k: torch.zeros_like(state[k], dtype=torch.float32) for k in net.update_keys}
    norms, examples, loss_sum, nonfinite, clipped = [], 0, 0.0, 0, 0
    lost = {count: 0 for count in _LOST.values()}
    loss_bound, bounded_loss_sum = task.loss_bound, 0.0
    for vc_index, user_ids, fault, override in plan:
        if fault in _LOST:
            log.debug("round %s: injected %s of virtual client %s", assignment.server_round, fault, vc_index)
            lost[_LOST[fault]] += 1
            continue
        result = LocalResult(override, 0, 0.0) if override is not None else next(trained)
        if result is None:  # its training raised (logged where it happened)
            lost[NUM_FAILED] += 1
            continue
        delta = result.delta
        diverged = not (is_finite(delta) and math.isfinite(result.mean_loss))
        if diverged:
            delta = {k: torch.zeros_like(v) for k, v in delta.items()}
            nonfinite += 1
        if assignment.clip_norm > 0:
            delta, norm = clip_to_norm(delta, assignment.clip_norm)
            clipped += norm > assignment.clip_norm
        else:
            norm = global_norm(delta)
        for k in total:
            total[k] += delta[k].to(torch.float32)
        if fault == "nan":  # injected: a broken client replies NaN
            total = {k: torch.full_like(v, float("nan")) for k, v in total.items()}
        norms.append(norm)
        examples += result.num_examples
        if not diverged:  # the mean train loss is over the virtual clients that trained normally
            loss_sum += result.mean_loss
        bounded_loss_sum += loss_bound if diverged else min(max(result.mean_loss, 0.0), loss_bound)
    metrics = {NUM_VIRTUAL_CLIENTS: len(assignment.virtual_clients), NUM_USERS: assignment.num_users,
               NUM_EXAMPLES: examples, NUM_NONFINITE: nonfinite, NUM_CLIPPED: int(clipped), **lost,
               LOSS_SUM: loss_sum, BOUNDED_LOSS_SUM: bounded_loss_sum, UPDATE_NORMS: [float(n) for n in norms]}
    return total, metrics


def simulated_node_fault(assignment: TrainAssignment) -> str | None:
    """node-timeout, node-drop (simulation.faults.node_*_rate) or None: whether this node's reply this
    round is to be late or lost. The ClientApp then replies at once with protocol.simulated_fault_reply
    instead of training; the server takes that as a reply after the deadline."""
    task = assignment.task
    return node_fault(task.faults, task.training_key, assignment.server_round,
                      [vc for vc, _ in assignment.virtual_clients])


def own_virtual_client(assignment: TrainAssignment, device: Population) -> TrainAssignment:
    """On a device the server names the device itself (its node id) as the one user of its one virtual
    client; the device trains its own user."""
    users = [users for _, users in assignment.virtual_clients]
    if len(users) != 1 or len(users[0]) != 1:
        raise DataError(f"a device trains one virtual client of one user; the server assigned {len(users)} "
                        f"virtual clients of {[len(u) for u in users]} users")
    (vc_index, _), = assignment.virtual_clients
    own_user = int(device.user_ids[0])
    return replace(assignment, virtual_clients=[(vc_index, (own_user,))])

