"""Train / evaluation / public populations, split by users (and optionally by classes).

The split is computed on row indices only (labels and user ids), so a dataset of millions of images is
never copied in memory: fedemb.data.store writes each split once per machine as memory-mapped files,
and every process opens those (fedemb.data.store.load_splits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedemb.data.loaders import RawDataset, load_dataset
from fedemb.data.partition import synthetic_users
from fedemb.data.population import Population
from fedemb.errors import DataError


@dataclass
class DataSplits:
    train: Population  # private users that federated training samples from
    eval: Population  # held-out users (and held-out classes when configured)
    public: Population | None  # users declared public, for central pretraining
    class_names: dict[int, str] | None = None  # image folders: the name of each class id


@dataclass
class SplitPlan:
    """Which rows of the raw arrays go where, and the user of every raw row."""

    raw: RawDataset
    train_users: np.ndarray  # user id of every row of raw.train
    test_users: np.ndarray | None  # ... of raw.test, when evaluation uses it
    train_rows: np.ndarray  # rows of raw.train
    public_rows: np.ndarray | None  # rows of raw.train
    eval_rows: np.ndarray  # rows of raw.test if there is one, else of raw.train; in their original order


def _users(split, cfg, seed_offset: int) -> np.ndarray:
    if split.users is not None:
        return np.asarray(split.users, dtype=np.int64)
    if cfg.num_users > len(split.labels):
        raise DataError(f"data.num_users = {cfg.num_users} exceeds the {len(split.labels)} examples")
    return synthetic_users(np.asarray(split.labels), cfg.partition, cfg.num_users, cfg.dirichlet_alpha,
                           cfg.shards_per_user, cfg.split_seed + seed_offset)


def plan_splits(cfg) -> SplitPlan:
    raw = load_dataset(cfg)
    users = _users(raw.train, cfg, 0)
    labels = np.asarray(raw.train.labels)
    rng = np.random.default_rng(cfg.split_seed)
    user_ids = rng.permutation(np.unique(users))
    n_public = int(round(cfg.public_users * len(user_ids)))
    test_users = None
    if raw.test is not None:
        test_users = _users(raw.test, cfg, 1)
        eval_labels = np.asarray(raw.test.labels)
        eval_rows = np.arange(len(eval_labels))
        n_eval = 0
    else:
        n_eval = max(1, int(round(cfg.eval_users * len(user_ids))))
        eval_labels = labels
        eval_rows = np.flatnonzero(np.isin(users, user_ids[:n_eval]))
    public_ids = user_ids[n_eval:n_eval + n_public]
    train_ids = user_ids[n_eval + n_public:]
    if len(train_ids) == 0:
        raise DataError("no training users left after holding out evaluation and public users")
    train_rows = np.flatnonzero(np.isin(users, train_ids))
    public_rows = np.flatnonzero(np.isin(users, public_ids)) if n_public else None

    held_out = np.asarray(cfg.held_out_classes, dtype=np.int64)
    if len(held_out):
        bad = [int(c) for c in held_out if c < 0 or c >= raw.num_classes]
        if bad:
            raise DataError(f"data.held_out_classes {bad} are not classes of this dataset (0..{raw.num_classes - 1})")
        train_rows = train_rows[~np.isin(labels[train_rows], held_out)]
        if public_rows is not None:
            public_rows = public_rows[~np.isin(labels[public_rows], held_out)]
        eval_rows = eval_rows[np.isin(eval_labels[eval_rows], held_out)]
    if len(eval_rows) > cfg.max_eval_examples:
        keep = np.sort(np.random.default_rng(cfg.split_seed + 2).choice(len(eval_rows), cfg.max_eval_examples,
                                                                         replace=False))
        eval_rows = eval_rows[keep]
    if len(eval_rows) < 2:
        raise DataError("the evaluation split has fewer than 2 examples")
    if len(train_rows) == 0:
        raise DataError("the training split is empty")
    return SplitPlan(raw, users, test_users, train_rows, public_rows, eval_rows)
