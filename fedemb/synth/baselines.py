"""Baselines on the same embeddings and the same user-level (ε, δ) as the DP mixture, each a release of
its own in the ledger (fedemb.privacy.release).

- DP class prototypes: one release of per-class sums (user-bounded like the mixture's statistics),
  nearest prototype by cosine, so the class counts need no budget.
- DP-SGD linear probe with Opacus. One "sample" of Opacus is one user: a user's rows (up to
  `probe_max_examples`) form one padded item, the loss is the user's mean, and Opacus clips each user's
  gradient and samples users by Poisson, so the guarantee is user-level. The noise multiplier for the
  target ε is Opacus's, for its sampling rate and number of steps; that (z, q, steps) is recorded before
  training starts and checked against Opacus's accountant history when it ends.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedemb.privacy.accountant import opacus_accountant
from fedemb.privacy.release import EntryNoise, LedgerStage, gaussian_entry
from fedemb.synth.contribution import cell_statistics, sum_sensitivity, user_weights
from fedemb.synth.embedded import RADIUS, Embedded

PROBE_RELEASE = "dp-sgd linear probe"


def dp_prototypes(emb: Embedded, num_classes: int, z: float, bound: float, stage: LedgerStage) -> np.ndarray:
    """(C, d) unit-norm prototypes from noisy per-class sums (sensitivity bound × radius)."""
    weights = user_weights(emb.users, emb.labels, num_classes, bound)
    sums = cell_statistics(emb.x, emb.labels, weights, num_classes).sums
    noisy = stage.gaussian("prototype sums", sums, z, sum_sensitivity(bound, RADIUS),
                           "Gaussian noise on the per-class sums", {"cells": num_classes, "dim": emb.dim})
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


def dpsgd_linear_probe(emb: Embedded, num_classes: int, epsilon: float, cfg, stage: LedgerStage
                       ) -> tuple[nn.Module, float]:
    """Train a linear layer with user-level DP-SGD at (epsilon, the ledger's δ), released into `stage`;
    returns it and the ε Opacus reports."""
    ledger = stage.ledger
    users = len(np.unique(emb.users))
    batch = max(1, min(cfg.probe_batch_users, users // 2))
    batches = math.ceil(users / batch)  # Opacus samples each user with q = 1 / batches
    q, steps = 1.0 / batches, cfg.probe_epochs * batches
    z = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=ledger.delta, sample_rate=q, steps=steps,
                                   accountant=opacus_accountant(ledger.accountant)))
    entry = gaussian_entry(stage.name, PROBE_RELEASE, z, cfg.probe_clip,
                           "DP-SGD (Opacus) on a linear probe: per-user clipped gradients, Poisson-sampled users",
                           ledger.unit, {"epochs": cfg.probe_epochs, "expected_batch_users": batch,
                                         "clip": cfg.probe_clip, "lr": cfg.probe_lr}, q=q, steps=steps)

    def train(noise: EntryNoise) -> tuple[nn.Module, float]:
        sampling_seed, noise_seed = noise.seed(0), noise.seed(1)
        torch.manual_seed(sampling_seed)  # the probe's initial weights
        items = user_items(emb, cfg.probe_max_examples, np.random.default_rng(sampling_seed))
        loader = DataLoader(items, batch_size=batch, shuffle=True,
                            generator=torch.Generator().manual_seed(sampling_seed))
        model = nn.Linear(emb.dim, num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.probe_lr, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode and the generator on every call
            engine = PrivacyEngine(accountant=opacus_accountant(ledger.accountant), secure_mode=False)
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=z,
                max_grad_norm=cfg.probe_clip, poisson_sampling=True,
                noise_generator=torch.Generator().manual_seed(noise_seed))
            for _ in range(cfg.probe_epochs):
                for x, y, mask in loader:  # an empty Poisson batch is still a step: noise on a zero gradient
                    optimizer.zero_grad()
                    logits = model(x)
                    per_row = nn.functional.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1),
                                                          reduction="none").reshape(y.shape)
                    per_user = (per_row * mask).sum(1) / mask.sum(1).clamp(min=1)
                    (per_user.sum() / max(len(x), 1)).backward()
                    optimizer.step()
            spent = float(engine.get_epsilon(ledger.delta))
        history = [(float(a), float(b), int(c)) for a, b, c in engine.accountant.history]
        if history != [(z, q, steps)]:
            raise RuntimeError(f"DP-SGD ran {history}, the ledger recorded {[(z, q, steps)]}")
        return model._module.eval(), spent

    return stage.run(entry, train)


@torch.no_grad()
def linear_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((model(torch.tensor(np.asarray(x))).argmax(1).numpy() == y).mean())
