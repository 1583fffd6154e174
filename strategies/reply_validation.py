"""Checks a train reply must pass before it touches the aggregate. A failed check rejects the reply
(with its reason) and never raises: one bad client must not stop a round.

The norm rule makes the sensitivity on the server exactly the C the accountant is told, whatever a
node did: a reply that sums n virtual clients (those assigned, less those it counts as failed, timed
out or dropped) is at most n·C after the check. Above n·C by at most the relative tolerance
NORM_TOLERANCE (the rounding of a node's float32 clipping and summation, far below 1e-3) it is
projected onto the n·C ball (scaled by n·C / norm) and marked projected; further above, no rounding
explains it (the node skipped or broke its clipping): it is rejected."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedemb.privacy.clipping import global_norm
from fedemb.protocol import LOST_COUNTS, METRICS, NUM_CLIPPED, NUM_USERS, NUM_VIRTUAL_CLIENTS, UPDATE, TrainAssignment

NORM_TOLERANCE = 1e-3  # relative excess over n·C still taken for rounding (projected); beyond it: rejected
NORM_SLACK = 0.0  # relative excess accepted as it is: none (tests set it huge to switch the norm check off)


@dataclass
class CheckedReply:
    update: dict[str, torch.Tensor] | None
    metrics: dict
    rejected: str | None  # the reason, or None when accepted
    projected: float = 0.0  # when the update was projected onto the n·C ball: its norm before, else 0
    bound: float = 0.0  # n·C for the n virtual clients the update sums


def check_reply(reply: Message, shapes: dict[str, tuple[int, ...]], assignment: TrainAssignment,
                clip_norm: float) -> CheckedReply:
    expected_count = len(assignment.virtual_clients)
    if reply.has_error():
        return CheckedReply(None, {}, f"client error {reply.error.code}: {reply.error.reason}")
    content = reply.content
    if set(content.keys()) != {UPDATE, METRICS}:
        return CheckedReply(None, {}, f"reply must hold exactly {UPDATE!r} and {METRICS!r}, got {sorted(content.keys())}")
    arrays, metrics = content[UPDATE], content[METRICS]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return CheckedReply(None, {}, "reply records have the wrong types")
    metrics = dict(metrics)
    if set(arrays.keys()) != set(shapes):
        extra, missing = sorted(set(arrays) - set(shapes)), sorted(set(shapes) - set(arrays))
        return CheckedReply(None, metrics, f"update keys differ from the model (extra {extra[:3]}, missing {missing[:3]})")
    update = {}
    for key, shape in shapes.items():
        arr = arrays[key]
        if arr.dtype != "float32" or tuple(arr.shape) != tuple(shape):
            return CheckedReply(None, metrics, f"{key}: expected float32 {tuple(shape)}, got {arr.dtype} {tuple(arr.shape)}")
        update[key] = torch.from_numpy(np.array(arr.numpy(), copy=True))
    if metrics.get(NUM_VIRTUAL_CLIENTS) != expected_count:
        return CheckedReply(None, metrics, f"reply claims {metrics.get(NUM_VIRTUAL_CLIENTS)} virtual clients, "
                                           f"{expected_count} were assigned")
    if metrics.get(NUM_USERS) != assignment.num_users:
        return CheckedReply(None, metrics, f"reply claims {metrics.get(NUM_USERS)} users, "
                                           f"{assignment.num_users} were assigned")
    clipped = metrics.get(NUM_CLIPPED)
    if not isinstance(clipped, int) or not 0 <= clipped <= expected_count:
        return CheckedReply(None, metrics, f"reply claims {clipped!r} clipped of {expected_count} virtual clients")
    lost = [metrics.get(count, 0) for count in LOST_COUNTS]
    for count, claimed in zip(LOST_COUNTS, lost):
        if not isinstance(claimed, int) or not 0 <= claimed <= expected_count:
            return CheckedReply(None, metrics, f"reply claims {claimed!r} {count.removeprefix('num-')} of "
                                               f"{expected_count} virtual clients")
    summed = expected_count - sum(lost)  # the virtual clients the update is the sum of
    if summed < 0:
        return CheckedReply(None, metrics, f"reply claims {sum(lost)} lost (failed, timed out or dropped) of "
                                           f"{expected_count} virtual clients")
    norm = global_norm(update)
    if not math.isfinite(norm):
        return CheckedReply(None, metrics, "update holds NaN or Inf")
    bound = summed * clip_norm
    if clip_norm > 0 and norm > bound * (1 + NORM_SLACK):
        if norm > bound * (1 + NORM_TOLERANCE):
            return CheckedReply(None, metrics, f"update norm {norm:.6g} exceeds {summed} x clip norm "
                                               f"{clip_norm:.4g} beyond rounding")
        return CheckedReply(project(update, bound, norm), metrics, None, projected=norm, bound=bound)
    return CheckedReply(update, metrics, None, bound=bound)


def project(update: dict[str, torch.Tensor], bound: float, norm: float) -> dict[str, torch.Tensor]:
    """The update scaled onto the ball of radius `bound` (its norm is `norm` > bound). float32 rounding
    of the scaled tensors can land a hair outside: the scale shrinks until the result is inside."""
    scale = bound / norm
    for _ in range(16):
        projected = {k: v * scale for k, v in update.items()}
        if global_norm(projected) <= bound:
            return projected
        scale *= 1 - 1e-7  # about one float32 rounding step
    return {k: torch.zeros_like(v) for k, v in update.items()}  # unreachable in practice; never above the bound
