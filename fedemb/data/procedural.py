"""Procedural populations: N synthetic users (N up to 10^7 and beyond) whose data is generated, on the
node that trains them, deterministically from (data.procedural.seed, user id), from a real base dataset.

User u is made of keyed draws (fedemb.privacy.keyed_random, keyed by the population seed; public
data-generation keys, not DP draws), each a function of (seed, u) alone:
- one real writer of the base's training pool (uniform), whose images it draws from;
- how many examples it has (uniform in examples_min..examples_max);
- a label mix: Dirichlet(label_concentration) over the classes its writer wrote (Gamma draws by
  inverse CDF);
- one transformation, applied to all its examples: rotation, scale, shear, shift, a smooth elastic
  field and a stroke width (fedemb.data.warp, bit-identical wherever it runs);
and example j of user u is, from keyed draws of (seed, u, j): a class from the mix, then one of the
writer's images of that class, through the user's transformation, quantised to uint8.

Nothing holds one value per user: user ids are 0..N-1 (a UserRange), row r of the population is
example r mod E of user r div E (E = examples_max), and what is kept is the base data (memory-mapped
from the machine's store) and a (writer, class) index of it. A node generates the users it trains
when it first reads them and keeps the most recent ones in a bounded cache.

The held-out evaluation users are real: the base's writers held out by data.eval_users (or its test
writers), which no procedural user is derived from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fedemb.data.population import Population, UserRange
from fedemb.data.splits import DataSplits
from fedemb.data.warp import (KNOTS, affine_matrices, bilinear, elastic_field, quantised, source_coordinates,
                              stroke_width)
from fedemb.errors import DataError
from fedemb.privacy.keyed_random import keyed_uniform
from fedemb.privacy.streams import (STREAM_PROC_ELASTIC, STREAM_PROC_EXAMPLES, STREAM_PROC_LABEL, STREAM_PROC_MIX,
                                    STREAM_PROC_PICK, STREAM_PROC_TRANSFORM, STREAM_PROC_WRITER)

PIXEL_LEVELS = 255  # generated images are uint8, pixel_scale 1/255, whatever the base's scale
CACHE_BYTES = 64 << 20  # generated users a process keeps (least recently used dropped first)
GENERATE_CHUNK = 16  # users generated together: their temporaries stay in the CPU's caches
_TRANSFORM_PARAMETERS = 6  # rotation, scale, shear, row shift, column shift, stroke


def procedural_splits(cfg, base: DataSplits) -> DataSplits:
    """The procedural population over `base`'s training writers; evaluation and public users are the
    base's own, real."""
    return DataSplits(ProceduralPopulation(cfg.procedural, base.train), base.eval, base.public, base.class_names)


class WriterPool:
    """The base training population's examples indexed by (writer, class): O(base) to build and keep."""

    def __init__(self, base: Population):
        self.base = base
        self.writers = np.asarray(base.user_ids, dtype=np.int64)  # sorted real writer ids
        if len(self.writers) == 0:
            raise DataError("the base dataset has no training writers to derive users from")
        self.num_classes = base.num_classes
        labels = np.asarray(base.labels, dtype=np.int64)
        cell = np.searchsorted(self.writers, np.asarray(base.users, dtype=np.int64)) * self.num_classes + labels
        self.rows = np.argsort(cell, kind="stable")  # base rows grouped by (writer, class)
        self.counts = np.bincount(cell, minlength=len(self.writers) * self.num_classes).reshape(len(self.writers), -1)
        self.starts = (np.cumsum(self.counts.reshape(-1)) - self.counts.reshape(-1)).reshape(self.counts.shape)

    def __len__(self) -> int:
        return len(self.writers)


@dataclass
class Generated:
    """A set of users' generated data: images (rows, C, H, W) uint8 and labels, user after user."""

    users: np.ndarray
    counts: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.counts) - self.counts


class _Rows:
    """`population.images` or `.labels`: indexed by rows, generated on demand (no array of all rows)."""

    def __init__(self, population: "ProceduralPopulation", which: str, shape: tuple[int, ...], dtype):
        self.population, self.which = population, which
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        images, labels = self.population.rows(rows)
        return images if self.which == "images" else labels

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"the {self.which} of a procedural population ({self.shape[0]} rows) are generated on "
                        "demand: index them with rows (population.examples_of(user))")


class ProceduralPopulation:
    """N generated users over a WriterPool, answering what a Population answers (fedemb.data.population)."""

    def __init__(self, settings, base: Population, cache_bytes: int = CACHE_BYTES):
        self.settings = settings
        self.pool = WriterPool(base)
        self.n = int(settings.users)
        self.seed = int(settings.seed)
        self.row_stride = int(settings.examples_max)  # row = user * row_stride + example
        self.num_classes = base.num_classes
        self.pixel_scale = 1.0 / PIXEL_LEVELS
        self._base_scale = float(base.pixel_scale)
        shape = tuple(int(s) for s in base.image_shape)
        self.images = _Rows(self, "images", (self.n * self.row_stride, *shape), np.uint8)
        self.labels = _Rows(self, "labels", (self.n * self.row_stride,), np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._lock = threading.Lock()

    # ------------------------------------------------------------ what a Population answers
    def __len__(self) -> int:
        """The size of the row space (users x examples_max); a user's rows are examples_of(user)."""
        return self.n * self.row_stride

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def user_ids(self) -> UserRange:
        return UserRange(self.n)

    @property
    def num_users(self) -> int:
        return self.n

    def examples_of(self, user_id: int) -> np.ndarray:
        if not 0 <= int(user_id) < self.n:
            return np.empty(0, dtype=np.int64)
        count = int(self.examples_count(np.array([user_id]))[0])
        return int(user_id) * self.row_stride + np.arange(count, dtype=np.int64)

    def examples_count(self, user_ids) -> np.ndarray:
        """How many examples each user has: one keyed draw per user, the one generate() uses."""
        users = self._checked(user_ids)
        return self._count(keyed_uniform(self.seed, users, 0, STREAM_PROC_EXAMPLES))

    def examples_per_user(self) -> np.ndarray:
        raise DataError(f"a procedural population of {self.n} users keeps no per-user array: ask "
                        "examples_count(user_ids) for the users at hand")

    def tensor(self, indices) -> torch.Tensor:
        """Images as float tensors normalised to [-1, 1], as Population.tensor."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[indices])).to(torch.float32)
        return x * (2.0 * self.pixel_scale) - 1.0

    def of_users(self, user_ids) -> Population:
        """These users' data as an ordinary in-memory Population (for previews, tests and shards)."""
        made = self.generate(np.asarray(list(user_ids) if not isinstance(user_ids, np.ndarray) else user_ids))
        users = np.repeat(made.users, made.counts)
        return Population(made.images, made.labels, users, self.pixel_scale, self.num_classes)

    def preview(self, users: int = 64) -> Population:
        """The first users' data: what a private log shows of the training data."""
        return self.of_users(np.arange(min(users, self.n)))

    def writers_of(self, user_ids) -> np.ndarray:
        """The real base writer each user derives from."""
        users = self._checked(user_ids)
        return self.pool.writers[self._writer(keyed_uniform(self.seed, users, 0, STREAM_PROC_WRITER))]

    # ------------------------------------------------------------ rows, generated on demand
    def rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of these rows, generating the users not in this process's cache."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        users, example = np.divmod(flat, self.row_stride)
        if flat.size and (flat.min() < 0 or users.max() >= self.n):
            raise IndexError(f"rows outside the {len(self)} rows of this population")
        wanted, inverse = np.unique(users, return_inverse=True)
        blocks = self._blocks(wanted)
        counts = np.array([len(b[1]) for b in blocks], dtype=np.int64)
        if np.any(example >= counts[inverse]):
            bad = int(np.flatnonzero(example >= counts[inverse])[0])
            raise IndexError(f"row {int(flat[bad])}: user {int(users[bad])} has {int(counts[inverse[bad]])} examples")
        starts = np.cumsum(counts) - counts
        index = starts[inverse] + example
        images = np.concatenate([b[0] for b in blocks]) if blocks else np.empty((0, *self.image_shape), np.uint8)
        labels = np.concatenate([b[1] for b in blocks]) if blocks else np.empty(0, np.int64)
        return images[index].reshape(*rows.shape, *self.image_shape), labels[index].reshape(rows.shape)

    def _blocks(self, users: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            missing = np.array([u for u in users.tolist() if u not in self._cache], dtype=np.int64)
            found = {u: self._cache[u] for u in users.tolist() if u in self._cache}
            for u in found:
                self._cache.move_to_end(u)
        if len(missing):
            made = self.generate(missing)
            for u, start, count in zip(made.users.tolist(), made.starts.tolist(), made.counts.tolist()):
                found[u] = (made.images[start:start + count], made.labels[start:start + count])
            with self._lock:
                for u in missing.tolist():
                    if u not in self._cache:
                        self._cache[u] = found[u]
                        self._cache_bytes += found[u][0].nbytes + found[u][1].nbytes
                while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                    _, (im, lab) = self._cache.popitem(last=False)
                    self._cache_bytes -= im.nbytes + lab.nbytes
        return [found[u] for u in users.tolist()]

    # ------------------------------------------------------------ generation
    def generate(self, user_ids) -> Generated:
        """These users' examples, user after user, each a pure function of (seed, user id); made
        GENERATE_CHUNK users at a time (larger batches only leave the CPU caches)."""
        users = self._checked(user_ids)
        if len(users) > GENERATE_CHUNK:
            parts = [self.generate(users[i:i + GENERATE_CHUNK]) for i in range(0, len(users), GENERATE_CHUNK)]
            return Generated(users, *(np.concatenate([getattr(part, k) for part in parts])
                                      for k in ("counts", "images", "labels")))
        draws = self._user_draws(users)
        counts = self._count(draws["examples"][:, 0])
        owner = np.repeat(np.arange(len(users)), counts)
        example = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        writer = self._writer(draws["writer"][:, 0])
        # per example: (user, example, stream) for its class and for which of the writer's images
        per_example = keyed_uniform(self.seed, users[owner, None], example[:, None],
                                    np.array([[STREAM_PROC_LABEL, STREAM_PROC_PICK]]))
        labels = self._labels(draws["mix"], writer, owner, per_example[:, 0])
        cell = writer[owner] * self.num_classes + labels
        counts_of = self.pool.counts.reshape(-1)[cell]
        pick = np.minimum((per_example[:, 1] * counts_of).astype(np.int64), counts_of - 1)
        base_rows = self.pool.rows[self.pool.starts.reshape(-1)[cell] + pick]
        images = self._transformed(draws, owner, base_rows)
        return Generated(users, counts, images, labels)

    def _user_draws(self, users: np.ndarray) -> dict[str, np.ndarray]:
        """Every per-user draw in one keyed call: (user, index, stream) for each column of _columns()."""
        streams, index = self._columns()
        u = keyed_uniform(self.seed, users[:, None], index[None, :], streams[None, :])
        out, at = {}, 0
        for name, width in self._widths().items():
            out[name], at = u[:, at:at + width], at + width
        return out

    def _widths(self) -> dict[str, int]:
        return {"writer": 1, "examples": 1, "mix": self.num_classes, "transform": _TRANSFORM_PARAMETERS,
                "elastic": 2 * KNOTS * KNOTS}

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        stream = {"writer": STREAM_PROC_WRITER, "examples": STREAM_PROC_EXAMPLES, "mix": STREAM_PROC_MIX,
                  "transform": STREAM_PROC_TRANSFORM, "elastic": STREAM_PROC_ELASTIC}
        widths = self._widths()
        return (np.concatenate([np.full(w, stream[name]) for name, w in widths.items()]).astype(np.int64),
                np.concatenate([np.arange(w) for w in widths.values()]).astype(np.int64))

    def _count(self, draws: np.ndarray) -> np.ndarray:
        low, high = self.settings.examples_min, self.settings.examples_max
        return low + np.minimum((draws * (high - low + 1)).astype(np.int64), high - low)

    def _writer(self, draws: np.ndarray) -> np.ndarray:
        return np.minimum((draws * len(self.pool)).astype(np.int64), len(self.pool) - 1)

    def _checked(self, user_ids) -> np.ndarray:
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n):
            raise IndexError(f"user ids outside 0..{self.n - 1}")
        return users

    def _labels(self, mix: np.ndarray, writer, owner, draws) -> np.ndarray:
        """Each example's class: the inverse CDF of its user's Dirichlet label mix at a keyed uniform."""
        from scipy.special import gammaincinv  # the Gamma(α) quantile: Dirichlet weights by inverse CDF

        present = self.pool.counts[writer] > 0  # (users, classes)
        weights = np.where(present, gammaincinv(self.settings.label_concentration, mix), 0.0)
        empty = np.flatnonzero(weights.sum(axis=1) <= 0)  # every Gamma draw underflowed (a tiny concentration):
        weights[empty, np.argmax(np.where(present[empty], mix[empty], -1.0), axis=1)] = 1.0  # its largest draw's class
        cumulative = np.cumsum(weights, axis=1)
        last = self.num_classes - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)  # the user's last class with weight
        x = draws * cumulative[owner, -1]
        label = (cumulative[owner] <= x[:, None]).sum(axis=1)
        return np.minimum(label, last[owner]).astype(np.int64)

    def _transformed(self, draws: dict[str, np.ndarray], owner: np.ndarray, base_rows: np.ndarray) -> np.ndarray:
        s = self.settings
        _, height, width = self.image_shape
        order = np.argsort(base_rows, kind="stable")  # a memory-mapped store reads best in row order
        images = np.empty((len(base_rows), *self.image_shape), dtype=np.float32)
        images[order] = np.asarray(self.pool.base.images[base_rows[order]], dtype=np.float32)
        images *= np.float32(self._base_scale)
        users = len(draws["transform"])
        if users == 0:
            return images.astype(np.uint8)
        t = draws["transform"] * 2.0 - 1.0  # (users, parameters) in [-1, 1)
        side = max(height, width)
        matrices = affine_matrices(np.deg2rad(t[:, 0] * s.rotation_deg), 1.0 + t[:, 1] * s.scale,
                                   np.deg2rad(t[:, 2] * s.shear_deg))
        shifts = quantised(t[:, 3:5] * (s.translate * side))
        fields = None
        if s.elastic > 0:
            knots = quantised((draws["elastic"] * 2.0 - 1.0) * (s.elastic * side)).reshape(users * 2, KNOTS, KNOTS)
            fields = elastic_field(knots, height, width).reshape(users, 2, height, width)
        if s.stroke > 0:
            images = stroke_width(images, quantised(t[:, 5] * s.stroke).astype(np.float32)[owner])
        rows, cols = source_coordinates(matrices, shifts, fields, height, width)
        images = bilinear(images, rows, cols, owner)
        return np.clip(np.floor(images * np.float32(PIXEL_LEVELS) + np.float32(0.5)), 0, PIXEL_LEVELS).astype(np.uint8)
