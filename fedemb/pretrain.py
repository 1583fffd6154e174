"""Central, non-private pretraining on users declared public; writes a backbone + embedding checkpoint.

Only data.public_users are touched: they are disjoint from the private training users and from the
held-out evaluation users, so the checkpoint costs no privacy budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedemb.data.splits import load_splits
from fedemb.errors import ConfigError
from fedemb.evaluation.embed import embed
from fedemb.evaluation.metrics import embedding_metrics
from fedemb.models.embedding_net import build_embedding_net, shared_state
from fedemb.run_dir import save_checkpoint


def pretrain_public(cfg, out: Path) -> dict:
    splits = load_splits(cfg.data)
    public = splits.public
    if public is None or len(public) == 0:
        raise ConfigError("data.public_users is 0: declare a fraction of users public to pretrain on")
    seed = cfg.run.seed if cfg.run.seed >= 0 else 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_embedding_net(cfg.model, public.image_shape, dp_enabled=False)
    before = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    head = nn.Linear(cfg.model.embedding_dim, public.num_classes, bias=False)
    pt = cfg.pretrain
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=pt.lr, momentum=pt.momentum)
    labels = torch.from_numpy(np.array(public.labels))
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(pt.epochs):
        order = rng.permutation(len(public))
        for start in range(0, len(order), pt.batch_size):
            batch = order[start:start + pt.batch_size]
            loss = loss_fn(head(net(public.tensor(batch))), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    after = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    save_checkpoint(Path(out), shared_state(net))
    return {"public_users": public.num_users, "examples": len(public), "before": before, "after": after}
