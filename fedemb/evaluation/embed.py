"""Embed a population with a model, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch

from fedemb.data.population import Population
from fedemb.errors import DataError


@torch.no_grad()
def embed(net: torch.nn.Module, pop: Population, batch_size: int = 512) -> np.ndarray:
    if hasattr(pop, "generate"):  # fedemb.data.procedural: rows are (user, example) slots, most of them empty
        raise DataError(f"cannot embed every user of a procedural population ({pop.num_users} users, generated on "
                        "demand): embed its held-out users (splits.eval) or some users' data (pop.of_users(ids))")
    was_training = net.training
    net.eval()
    out = [net(pop.tensor(np.arange(s, min(s + batch_size, len(pop))))).numpy()
           for s in range(0, len(pop), batch_size)]
    net.train(was_training)
    return np.concatenate(out).astype(np.float32)
