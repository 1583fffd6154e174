"""Images laid out one class per row, for PNG files and TensorBoard's images tab."""

from __future__ import annotations

import numpy as np


def class_rows(images: np.ndarray, labels: np.ndarray, per_class: int = 16, max_classes: int | None = None):
    """A (C, H, W) float tensor in [0, 1]: row i holds up to per_class images of the i-th smallest class
    id (the row is padded grey when the class has fewer). `images` are (n, C, H, W) in [0, 1]."""
    import torch
    from torchvision.utils import make_grid

    rows = []
    for c in np.unique(labels)[:max_classes]:
        picked = np.asarray(images[labels == c][:per_class], dtype=np.float32)
        pad = np.full((per_class - len(picked), *images.shape[1:]), 0.5, dtype=np.float32)
        rows.append(np.concatenate([picked, pad]))
    return make_grid(torch.as_tensor(np.concatenate(rows)), nrow=per_class, padding=1, pad_value=0.5)


def sample_by_class(population, per_class: int = 16, max_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Up to per_class examples of each of the first max_classes classes of a Population, as
    (images in [0, 1] as float32, labels), read from its (memory-mapped) store."""
    labels = np.asarray(population.labels)
    picked = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)[:max_classes]]))
    return np.asarray(population.images[picked], dtype=np.float32) * population.pixel_scale, labels[picked]
