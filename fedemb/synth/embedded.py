"""Labelled embeddings with the user of every row: what the synthesis statistics are computed on.

Rows are projected onto the unit sphere (radius 1) after optional centring with a public mean, so
every released statistic has a data-independent bound (fedemb.synth.contribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.errors import DataError

RADIUS = 1.0


@dataclass
class Embedded:
    x: np.ndarray  # (n, d) float32, on the sphere of radius RADIUS
    labels: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64

    def __post_init__(self):
        if self.x.ndim != 2 or len(self.labels) != len(self.x) or len(self.users) != len(self.x):
            raise DataError(f"embeddings must be (n, d) with one label and one user per row; got {self.x.shape}, "
                            f"{len(self.labels)} labels, {len(self.users)} users")

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def __len__(self) -> int:
        return len(self.x)

    def save(self, path: Path) -> None:
        np.savez(path, embeddings=self.x, labels=self.labels, users=self.users)


def to_sphere(x: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Centre (with a public mean) and L2-normalise; a zero row stays zero (norm 0 <= RADIUS)."""
    x = np.asarray(x, dtype=np.float32)
    if centre is not None:
        x = x - centre.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (RADIUS * x / np.maximum(norms, 1e-12)).astype(np.float32)


def load_embedded(path: Path, dim: int | None = None) -> Embedded:
    """An .npz with `embeddings` (n, d), `labels` (n,) and `users` (n,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embedding file not found: {path}")
    try:
        with np.load(path) as f:
            missing = {"embeddings", "labels", "users"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)} (needs embeddings, labels, users)")
            x, labels, users = f["embeddings"], f["labels"], f["users"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if x.ndim != 2:
        raise DataError(f"{path}: embeddings must be 2-D (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{path}: embeddings have dimension {x.shape[1]}, expected {dim}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: embeddings hold NaN or Inf")
    if labels.ndim != 1 or len(labels) != len(x) or users.ndim != 1 or len(users) != len(x):
        raise DataError(f"{path}: labels and users must be 1-D with one entry per embedding ({len(x)})")
    if not (np.issubdtype(labels.dtype, np.integer) and np.issubdtype(users.dtype, np.integer)):
        raise DataError(f"{path}: labels and users must be integers")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0")
    return Embedded(np.asarray(x, dtype=np.float32), labels.astype(np.int64), users.astype(np.int64))
