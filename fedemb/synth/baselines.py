"""Baselines on the same embeddings and the same user-level (ε, δ) as the DP mixture.

- DP class prototypes: one release of per-class sums (user-bounded like the mixture's statistics),
  nearest prototype by cosine, so the class counts need no budget.
- DP-SGD linear probe with Opacus (`make_private_with_epsilon`). One "sample" of Opacus is one user:
  a user's rows (up to `probe_max_examples`) form one padded item, the loss is the user's mean, and
  Opacus clips each user's gradient and samples users by Poisson, so the guarantee is user-level.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedemb.synth.contribution import cell_statistics, sum_sensitivity, user_weights
from fedemb.synth.embedded import RADIUS, Embedded


def dp_prototypes(emb: Embedded, num_classes: int, z: float, bound: float, rng: np.random.Generator,
                  record=None) -> np.ndarray:
    """(C, d) unit-norm prototypes from noisy per-class sums (sensitivity bound × radius)."""
    weights = user_weights(emb.users, emb.labels, num_classes, bound)
    sums = cell_statistics(emb.x, emb.labels, weights, num_classes).sums
    sensitivity = sum_sensitivity(bound, RADIUS)
    if record is not None:
        record("prototype sums", z, sensitivity, {"cells": num_classes, "dim": emb.dim})
    noisy = sums + z * sensitivity * rng.standard_normal(sums.shape)
    return noisy / np.maximum(np.linalg.norm(noisy, axis=1, keepdims=True), 1e-12)


def prototype_accuracy(prototypes: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ prototypes.T).argmax(1) == y).mean())


def user_items(emb: Embedded, max_examples: int, rng: np.random.Generator) -> TensorDataset:
    """One padded item per user: rows (m, d), labels (m,), mask (m,)."""
    order = np.argsort(emb.users, kind="stable")
    users, starts = np.unique(emb.users[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    m = int(min(max_examples, (ends - starts).max()))
    x = np.zeros((len(users), m, emb.dim), dtype=np.float32)
    y = np.zeros((len(users), m), dtype=np.int64)
    mask = np.zeros((len(users), m), dtype=np.float32)
    for i, (a, b) in enumerate(zip(starts, ends)):
        rows = order[a:b]
        if len(rows) > m:
            rows = rng.choice(rows, size=m, replace=False)
        x[i, :len(rows)], y[i, :len(rows)], mask[i, :len(rows)] = emb.x[rows], emb.labels[rows], 1.0
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask))


def dpsgd_linear_probe(emb: Embedded, num_classes: int, epsilon: float, delta: float, accountant: str, cfg,
                       seed: int) -> tuple[nn.Module, float]:
    """Train a linear layer with user-level DP-SGD; returns it and the ε Opacus reports."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    items = user_items(emb, cfg.probe_max_examples, rng)
    batch = max(1, min(cfg.probe_batch_users, len(items) // 2))
    loader = DataLoader(items, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = nn.Linear(emb.dim, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.probe_lr, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode and the generator on every call
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
            epochs=cfg.probe_epochs, max_grad_norm=cfg.probe_clip, poisson_sampling=True)
        for _ in range(cfg.probe_epochs):
            for x, y, mask in loader:
                if len(x) == 0:
                    continue
                optimizer.zero_grad()
                logits = model(x)
                per_row = nn.functional.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1),
                                                      reduction="none").reshape(y.shape)
                per_user = (per_row * mask).sum(1) / mask.sum(1).clamp(min=1)
                per_user.mean().backward()
                optimizer.step()
        spent = float(engine.get_epsilon(delta))
    return model._module.eval(), spent


@torch.no_grad()
def linear_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((model(torch.tensor(np.asarray(x))).argmax(1).numpy() == y).mean())
