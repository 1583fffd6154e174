"""The server's evaluation of a run's model on the held-out users, and what TensorBoard shows of it."""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedemb.data.splits import DataSplits
from fedemb.evaluation.embed import embed
from fedemb.evaluation.metrics import embedding_metrics
from fedemb.models.embedding_net import EmbeddingNet
from fedemb.monitoring.image_grid import sample_by_class

PROJECTOR_MAX_POINTS = 2000


class Evaluator:
    def __init__(self, net: EmbeddingNet, splits: DataSplits):
        self.net = copy.deepcopy(net)
        self.pop = splits.eval
        self.last_embeddings: np.ndarray | None = None
        self._projector_images: torch.Tensor | None = None  # the same at every evaluation: read once

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.net.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        self.last_embeddings = embed(self.net, self.pop)
        return MetricRecord(embedding_metrics(self.last_embeddings, self.pop.labels))

    def projection(self):
        """The latest evaluation for the projector: unit-length embeddings, classes, users and images in
        [0, 1] of the first PROJECTOR_MAX_POINTS held-out examples."""
        if self.last_embeddings is None:
            return None
        n = min(len(self.last_embeddings), PROJECTOR_MAX_POINTS)
        emb = self.last_embeddings[:n]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb, self.pop.labels[:n], self.pop.users[:n], self._images(n)

    def inputs(self, per_class: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Held-out images as the model sees them (after resizing), up to per_class of each class."""
        return sample_by_class(self.pop, per_class)

    def _images(self, n: int) -> torch.Tensor:
        if self._projector_images is None:  # a copy: the store is read-only
            self._projector_images = torch.from_numpy(np.array(self.pop.images[:n])).to(torch.float32) * self.pop.pixel_scale
        return self._projector_images
