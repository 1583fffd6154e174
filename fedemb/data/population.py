"""A population of users: images, labels and the user each example belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Population:
    images: np.ndarray  # (n, C, H, W), uint8 or float32 in [0, 1 / pixel_scale]
    labels: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64 user id of each example
    pixel_scale: float  # images * pixel_scale lies in [0, 1]
    num_classes: int
    _index: dict[int, np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or len(self.labels) != n or len(self.users) != n:
            raise ValueError("images must be (n, C, H, W) with one label and one user per image")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.users = np.asarray(self.users, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def user_ids(self) -> np.ndarray:
        return np.asarray(sorted(self._user_index()), dtype=np.int64)

    @property
    def num_users(self) -> int:
        return len(self._user_index())

    def examples_of(self, user_id: int) -> np.ndarray:
        return self._user_index().get(int(user_id), np.empty(0, dtype=np.int64))

    def examples_per_user(self) -> dict[int, int]:
        return {u: len(ix) for u, ix in self._user_index().items()}

    def _user_index(self) -> dict[int, np.ndarray]:
        if self._index is None:
            order = np.argsort(self.users, kind="stable")
            uniq, starts = np.unique(self.users[order], return_index=True)
            bounds = list(starts[1:]) + [len(order)]
            self._index = {int(u): order[s:e] for u, s, e in zip(uniq, starts, bounds)}
        return self._index

    def select(self, mask: np.ndarray) -> "Population":
        return Population(self.images[mask], self.labels[mask], self.users[mask], self.pixel_scale,
                          self.num_classes)

    def of_users(self, user_ids) -> "Population":
        return self.select(np.isin(self.users, np.asarray(list(user_ids), dtype=np.int64)))

    def tensor(self, indices: np.ndarray) -> torch.Tensor:
        """Images as float tensors normalised to [-1, 1] (fixed constants: nothing learnt from data)."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[indices])).to(torch.float32)
        return x * (2.0 * self.pixel_scale) - 1.0
