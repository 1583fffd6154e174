"""Checks a train reply must pass before it touches the aggregate. A failed check rejects the reply
(with its reason) and never raises: one bad client must not stop a round."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedemb.privacy.clipping import global_norm
from fedemb.protocol import METRICS, NUM_CLIPPED, NUM_FAILED, NUM_USERS, NUM_VIRTUAL_CLIENTS, UPDATE, TrainAssignment

NORM_SLACK = 1e-4  # float32 summation rounding; far below any meaningful leak


@dataclass
class CheckedReply:
    update: dict[str, torch.Tensor] | None
    metrics: dict
    rejected: str | None  # the reason, or None when accepted


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
    failed = metrics.get(NUM_FAILED, 0)
    if not isinstance(failed, int) or not 0 <= failed <= expected_count:
        return CheckedReply(None, metrics, f"reply claims {failed!r} failed of {expected_count} virtual clients")
    norm = global_norm(update)
    if not math.isfinite(norm):
        return CheckedReply(None, metrics, "update holds NaN or Inf")
    if clip_norm > 0 and norm > expected_count * clip_norm * (1 + NORM_SLACK):
        return CheckedReply(None, metrics, f"update norm {norm:.4g} exceeds {expected_count} x clip norm {clip_norm:.4g}")
    return CheckedReply(update, metrics, None)
