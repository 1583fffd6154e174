"""A population of users: images, labels and the user each example belongs to.

A population answers for its users with `user_ids` (sorted), `num_users`, `examples_of(user)` (row
indices) and `examples_count(users)`, and for its rows with `labels[rows]`, `images[rows]` and
`tensor(rows)`. A stored population (this module's Population) holds arrays; a generated one
(fedemb.data.procedural) answers the same questions without one value per user anywhere: its
`user_ids` is a UserRange, so samplers and strategies index positions and never see an N-array.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class UserRange:
    """The user ids 0..n-1 of a population too large to list: len() and indexing by positions (an int, a
    slice, an integer array) cost what is asked, never O(n). Converting it to an array (np.asarray)
    lists every id: only small populations should be asked that."""

    lazy_ids = True  # fedemb.privacy.sampling.indexable_ids keeps it as it is
    dtype = np.dtype(np.int64)
    ndim = 1

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"a population has n >= 0 users, not {n}")
        self.n = int(n)

    @property
    def shape(self) -> tuple[int]:
        return (self.n,)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"UserRange({self.n})"

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.n if key < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"position {int(key)} of {self.n} users")
            return np.int64(i)
        if isinstance(key, slice):
            return np.arange(*key.indices(self.n), dtype=np.int64)
        positions = np.asarray(key).astype(np.int64)
        positions = np.where(positions < 0, positions + self.n, positions)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside 0..{self.n - 1}")
        return positions

    def __iter__(self):
        return iter(range(self.n))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.arange(self.n, dtype=dtype or np.int64)


@dataclass
class Population:
    images: np.ndarray  # (n, C, H, W), uint8 or float32 in [0, 1 / pixel_scale]
    labels: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64 user id of each example
    pixel_scale: float  # images * pixel_scale lies in [0, 1]
    num_classes: int
    # rows sorted by user: (sorted user ids, first row of each); lets a memory-mapped population answer
    # examples_of without building an index of all its rows in every process
    sorted_index: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    _index: dict[int, np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or len(self.labels) != n or len(self.users) != n:
            raise ValueError("images must be (n, C, H, W) with one label and one user per image")
        if not isinstance(self.labels, np.memmap):
            self.labels = np.asarray(self.labels, dtype=np.int64)
        if not isinstance(self.users, np.memmap):
            self.users = np.asarray(self.users, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def user_ids(self) -> np.ndarray:
        if self.sorted_index is not None:
            return np.asarray(self.sorted_index[0], dtype=np.int64)
        return np.asarray(sorted(self._user_index()), dtype=np.int64)

    @property
    def num_users(self) -> int:
        return len(self.user_ids) if self.sorted_index is not None else len(self._user_index())

    def examples_of(self, user_id: int) -> np.ndarray:
        if self.sorted_index is not None:
            ids, starts = self.sorted_index
            i = int(np.searchsorted(ids, user_id))
            if i == len(ids) or ids[i] != user_id:
                return np.empty(0, dtype=np.int64)
            end = int(starts[i + 1]) if i + 1 < len(ids) else len(self)
            return np.arange(int(starts[i]), end, dtype=np.int64)
        return self._user_index().get(int(user_id), np.empty(0, dtype=np.int64))

    def examples_per_user(self) -> np.ndarray:
        """Example counts, aligned with user_ids."""
        if self.sorted_index is not None:
            return np.diff(np.append(np.asarray(self.sorted_index[1]), len(self))).astype(np.int64)
        index = self._user_index()
        return np.array([len(index[int(u)]) for u in self.user_ids], dtype=np.int64)

    def examples_count(self, user_ids) -> np.ndarray:
        """How many examples each of `user_ids` has (0 for an id not in the population): O(len(user_ids))."""
        return np.array([len(self.examples_of(int(u))) for u in np.asarray(user_ids, dtype=np.int64).reshape(-1)],
                        dtype=np.int64)

    def preview(self) -> "Population":
        """The examples a private log may show a grid of: all of them (read lazily from the store)."""
        return self

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
