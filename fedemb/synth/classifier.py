"""The small classifiers trained on embeddings: a two-layer MLP, and accuracy on real embeddings."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def make_mlp(dim: int, num_classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def train_mlp(x: np.ndarray, y: np.ndarray, num_classes: int, hidden: int = 256, epochs: int = 30,
              lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> nn.Module:
    """Adam with weight decay on (x, y); deterministic in the seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_mlp(x.shape[1], num_classes, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.tensor(np.asarray(x), dtype=torch.float32), torch.tensor(np.asarray(y), dtype=torch.int64)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = model(torch.tensor(np.asarray(x), dtype=torch.float32))
    return float((logits.argmax(1).numpy() == y).mean())
