"""Image classifiers trained on synthetic images only, then tested on real ones.

- `fresh_classifier`: the private model's architecture (backbone + embedding layer) with a linear
  class layer, from random initialisation: what the synthetic images alone teach.
- `EncoderHead`: the released private encoder, frozen, with a linear head on its normalised embedding:
  a user's specialised model, which needs few images because the encoder is already trained.

Hard labels train with cross-entropy; soft labels (distillation) with the KL divergence to a teacher's
class probabilities on the same augmented batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedemb.models.embedding_net import build_embedding_net


def fresh_classifier(model_cfg, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_embedding_net(model_cfg, image_shape, dp_enabled=False)
    return nn.Sequential(net, nn.ReLU(), nn.Linear(model_cfg.embedding_dim, num_classes))


class EncoderHead(nn.Module):
    def __init__(self, encoder: nn.Module, centre: np.ndarray | None, embedding_dim: int, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = encoder
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.register_buffer("centre", torch.as_tensor(centre if centre is not None else np.zeros(embedding_dim),
                                                       dtype=torch.float32))
        self.head = nn.Linear(embedding_dim, num_classes)

    def train(self, mode: bool = True) -> "EncoderHead":
        super().train(mode)
        self.encoder.eval()  # frozen: the released weights, as they are
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            e = F.normalize(self.encoder(x) - self.centre, dim=1)
        return self.head(e)


def shifted(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random shift of up to max_shift pixels, padding with background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def affine(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Each image rotated by up to ±15° × strength and scaled by up to ±15% × strength, padding with
    background (-1)."""
    if strength <= 0:
        return x
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15) * strength
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.15 * strength
    cos, sin, zero = torch.cos(angle) / scale, torch.sin(angle) / scale, torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(model: nn.Module, images: np.ndarray, epochs: int, lr: float, seed: int,
                     labels: np.ndarray | None = None,
                     teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     batch_size: int = 64, max_shift: int = 1, affine_strength: float = 0.0) -> nn.Module:
    """images (n, C, H, W) in [0, 1]. Exactly one of `labels` (hard) and `teacher` (soft: model-scale
    batch -> class probabilities) gives the targets. Every batch is augmented: random shifts of up to
    `max_shift` pixels, then random rotations and scalings (`affine_strength`; 0: none); a teacher
    labels the augmented batch."""
    if (labels is None) == (teacher is None):
        raise ValueError("give hard labels or a teacher, not both")
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(images, dtype=torch.float32) * 2 - 1
    y = torch.as_tensor(labels, dtype=torch.int64) if labels is not None else None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = affine(shifted(x[idx], max_shift, gen), affine_strength, gen)
            logits = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(xb)
                loss = F.kl_div(F.log_softmax(logits, 1), soft, reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1024) -> float:
    """images (n, C, H, W) in [0, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        xb = torch.as_tensor(images[start:start + batch_size], dtype=torch.float32) * 2 - 1
        correct += int((model(xb).argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / max(len(images), 1)


def prototype_teacher(encoder: nn.Module, prototypes: np.ndarray, centre: np.ndarray | None,
                      temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The private model as a classifier: softmax of cosine similarity to the class prototypes."""
    p = torch.as_tensor(prototypes, dtype=torch.float32)
    c = torch.as_tensor(centre, dtype=torch.float32) if centre is not None else None
    encoder.eval()

    def probabilities(xb: torch.Tensor) -> torch.Tensor:
        e = encoder(xb)
        if c is not None:
            e = e - c
        return F.softmax(F.normalize(e, dim=1) @ p.T / temperature, dim=1)
    return probabilities
