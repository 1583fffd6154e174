"""Central, non-private training of the embedding net with a softmax head over all classes.

- `fedemb pretrain`: on the users declared public only. They are disjoint from the private training
  users and from the held-out evaluation users, so the checkpoint costs no privacy budget.
- `fedemb centralized`: on all the private training users pooled: the non-private, non-federated
  reference a DP-FedEmb run is compared with. It writes a run directory like a federated run
  (config.toml, results.json, checkpoints/final.pt), with ε = ∞.
Both use the [pretrain] optimisation settings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedemb.data.population import Population
from fedemb.data.store import load_splits
from fedemb.errors import ConfigError
from fedemb.evaluation.embed import embed
from fedemb.evaluation.metrics import embedding_metrics
from fedemb.models.embedding_net import EmbeddingNet, build_embedding_net, shared_state
from fedemb.run_dir import save_checkpoint, write_json
from fedemb.training.logits import class_logits


def train_central(net: EmbeddingNet, pop: Population, pt, seed: int, head_logits: str = "dot",
                  head_scale: float = 1.0) -> float:
    """SGD with momentum over the pooled examples for pt.epochs, with the federated clients' kind of
    logits (client.head_logits); the mean loss of the last epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = nn.Linear(net.embedding.out_features, pop.num_classes, bias=False)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=pt.lr, momentum=pt.momentum)
    labels = torch.from_numpy(np.array(pop.labels))
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    losses: list[float] = []
    for _ in range(pt.epochs):
        order = rng.permutation(len(pop))
        losses = []
        for start in range(0, len(order), pt.batch_size):
            batch = order[start:start + pt.batch_size]
            loss = loss_fn(class_logits(net(pop.tensor(batch)), head.weight, head_logits, head_scale), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def pretrain_public(cfg, out: Path) -> dict:
    splits = load_splits(cfg.data)
    public = splits.public
    if public is None or len(public) == 0:
        raise ConfigError("data.public_users is 0: declare a fraction of users public to pretrain on")
    seed = cfg.run.seed if cfg.run.seed >= 0 else 0
    torch.manual_seed(seed)
    net = build_embedding_net(cfg.model, public.image_shape, dp_enabled=False)
    before = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    train_central(net, public, cfg.pretrain, seed, cfg.client.head_logits, cfg.client.head_scale)
    after = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    save_checkpoint(Path(out), shared_state(net))
    return {"public_users": public.num_users, "examples": len(public), "before": before, "after": after}


def train_centralized(cfg, run_dir: Path) -> dict:
    """The non-private centralized reference on the training users; results.json in run_dir."""
    started = time.monotonic()
    splits = load_splits(cfg.data)
    seed = cfg.run.seed if cfg.run.seed >= 0 else 0
    torch.manual_seed(seed)
    net = build_embedding_net(cfg.model, splits.train.image_shape, dp_enabled=False)
    initial = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    loss = train_central(net, splits.train, cfg.pretrain, seed, cfg.client.head_logits, cfg.client.head_scale)
    final = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    save_checkpoint(run_dir / "checkpoints" / "final.pt", shared_state(net))
    results = {
        "method": "centralized",
        "initial": initial,
        "final": final,
        "train_loss": loss,
        "epochs": cfg.pretrain.epochs,
        "privacy": {"enabled": False, "epsilon": float("inf"), "unit": "user", "population": splits.train.num_users},
        "examples": len(splits.train),
        "checkpoint": "checkpoints/final.pt",
        "wall_seconds": time.monotonic() - started,
    }
    write_json(run_dir / "results.json", results)
    return results
