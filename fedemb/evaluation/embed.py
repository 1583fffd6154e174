"""Embed a population with a model, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch

from fedemb.data.population import Population


@torch.no_grad()
def embed(net: torch.nn.Module, pop: Population, batch_size: int = 512) -> np.ndarray:
    was_training = net.training
    net.eval()
    out = [net(pop.tensor(np.arange(s, min(s + batch_size, len(pop))))).numpy()
           for s in range(0, len(pop), batch_size)]
    net.train(was_training)
    return np.concatenate(out).astype(np.float32)
