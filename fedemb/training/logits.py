"""Class logits of a head over embeddings: a plain dot product, or a scaled cosine (normalised softmax).

The dot product lets a client sharpen its softmax by growing the embedding and the head, which under
federated training grows the shared model round after round: most virtual clients then fit their few
examples with near-zero updates while the few they get wrong send huge ones (docs/results.md, "Training
utility"). The cosine head bounds every logit by the scale s, so a virtual client can only change
directions, which is also what evaluation measures (cosine similarity of normalised embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def class_logits(embeddings: torch.Tensor, weight: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """(..., B, E) embeddings against (..., C, E) class rows -> (..., B, C) logits; batch dimensions
    broadcast (one head, or one per stacked client)."""
    if kind == "cosine":
        embeddings = F.normalize(embeddings, dim=-1, eps=EPS)
        weight = F.normalize(weight, dim=-1, eps=EPS)
        return scale * torch.matmul(embeddings, weight.transpose(-1, -2))
    return torch.matmul(embeddings, weight.transpose(-1, -2))
