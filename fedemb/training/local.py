"""Train one virtual client: k users' examples, a fresh private head, and the shared embedding net.

Returns Δ = initial − trained over the shared state (what the server treats as a gradient).
The head is created here and dropped here: it is never part of what is returned.

The head starts either from its own random draw (the reference) or from the run's class anchors: one
random unit vector per class, drawn once from the run's training key, identical on every virtual
client and in every round. Anchors depend on no data, so they carry no privacy cost; they give every
virtual client the same target direction for each class, so the clipped updates of different virtual
clients point the same way and add up instead of cancelling (docs/noise-ablation.md measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pydantic import Field

from fedemb.config import ClientConfig
from fedemb.data.population import Population
from fedemb.models.embedding_net import EmbeddingNet, update_state
from fedemb.training.logits import class_logits


class LocalTrainingConfig(ClientConfig):
    """The run's [client] settings and the number of classes a head covers."""

    num_classes: int = Field(ge=1)


@dataclass
class LocalResult:
    delta: dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float


def example_schedule(pop: Population, user_ids, epochs: int, max_examples: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The k users' examples interleaved and shuffled, once per epoch, capped for the whole client."""
    pool = np.concatenate([pop.examples_of(u) for u in user_ids]) if len(user_ids) else np.empty(0, np.int64)
    if len(pool) == 0:
        return pool
    epochs_needed = min(epochs, -(-max_examples // len(pool)))
    order = np.concatenate([rng.permutation(pool) for _ in range(epochs_needed)])
    return order[:max_examples]


def class_anchors(num_classes: int, embedding_dim: int, seed: int) -> torch.Tensor:
    """One random unit vector per class (rows), a pure function of the seed."""
    rows = torch.randn(num_classes, embedding_dim, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


def make_head(embedding_dim: int, labels: np.ndarray, cfg: LocalTrainingConfig,
              anchors: torch.Tensor | None = None) -> tuple[nn.Linear, np.ndarray]:
    """A fresh linear head (no bias) and the labels as its targets.
    local: one output per class present in this virtual client (labels remapped); global: all classes.
    With anchors (num_classes x embedding_dim), the head starts from the rows of its classes."""
    classes = np.arange(cfg.num_classes) if cfg.head == "global" else np.unique(labels)
    head = nn.Linear(embedding_dim, len(classes), bias=False)
    if anchors is not None:
        with torch.no_grad():
            head.weight.copy_(anchors[torch.from_numpy(classes)])
    targets = labels if cfg.head == "global" else np.searchsorted(classes, labels)
    return head, targets


def train_virtual_client(net: EmbeddingNet, pop: Population, user_ids, cfg: LocalTrainingConfig,
                         seed: int, anchors: torch.Tensor | None = None) -> LocalResult:
    """Trains on the device of `net`'s parameters; Δ comes back on the CPU."""
    device = next(net.parameters()).device
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    schedule = example_schedule(pop, user_ids, cfg.epochs, cfg.max_examples, rng)
    initial = {k: v.detach().clone() for k, v in update_state(net).items()}
    if len(schedule) == 0:
        return LocalResult({k: torch.zeros_like(v).cpu() for k, v in initial.items()}, 0, 0.0)
    if cfg.head == "shared":  # DP-FedAvg baseline: the server's classifier, trained and sent back
        head, targets = net.classifier, np.asarray(pop.labels[schedule], dtype=np.int64)
    else:
        head, targets = make_head(net.embedding.out_features, pop.labels[schedule], cfg, anchors)
        head = head.to(device)
    targets = torch.from_numpy(targets).to(device)
    body = [p for name, p in net.named_parameters() if p.requires_grad and not name.startswith("classifier.")]
    body_opt = torch.optim.SGD(body, lr=cfg.lr, momentum=cfg.momentum)
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.lr * cfg.head_lr_scale, momentum=cfg.momentum)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    loss_sum, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    for step, start in enumerate(range(0, len(schedule), cfg.batch_size)):
        x = pop.tensor(schedule[start:start + cfg.batch_size]).to(device)
        y = targets[start:start + cfg.batch_size]
        loss = loss_fn(class_logits(net(x), head.weight, cfg.head_logits, cfg.head_scale), y)
        body_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.head_warmup_steps == 0:
            body_opt.step()
            head_opt.step()
        elif step < cfg.head_warmup_steps:  # warm-up: the head only
            head_opt.step()
        else:  # after warm-up: the backbone and embedding only (as the reference does)
            body_opt.step()
        loss_sum += loss.detach()  # read once at the end: a read per step would wait for the GPU each step
        steps += 1
    trained = update_state(net)
    delta = {k: (initial[k] - trained[k].detach()).cpu() for k in initial}
    return LocalResult(delta, len(schedule), float(loss_sum) / steps)
