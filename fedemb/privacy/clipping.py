"""Joint L2 norm and clipping of an update given as named tensors."""

from __future__ import annotations

import math

import torch

Update = dict[str, torch.Tensor]


def global_norm(update: Update) -> float:
    """L2 norm of all tensors taken together (float64 accumulation)."""
    total = 0.0
    for t in update.values():
        total += float(torch.sum(t.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def is_finite(update: Update) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def clip_to_norm(update: Update, clip_norm: float) -> tuple[Update, float]:
    """Scale the update so its joint L2 norm is at most clip_norm. Returns (clipped, norm before)."""
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm
