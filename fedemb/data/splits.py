"""Train / evaluation / public populations, split by users (and optionally by classes)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from fedemb.data.loaders import DATASETS, RawSplit
from fedemb.data.partition import synthetic_users
from fedemb.data.population import Population
from fedemb.errors import DataError


@dataclass
class DataSplits:
    train: Population  # private users that federated training samples from
    eval: Population  # held-out users (and held-out classes when configured)
    public: Population | None  # users declared public, for central pretraining


def load_splits(data_cfg) -> DataSplits:
    """Deterministic in the data config: every process that loads it gets the same split."""
    return _load_splits_cached(json.dumps(asdict(data_cfg), sort_keys=True))


@lru_cache(maxsize=4)
def _load_splits_cached(key: str) -> DataSplits:
    from fedemb.config import DataConfig

    return _load_splits(DataConfig(**json.loads(key)))


def _population(split: RawSplit, cfg, num_classes: int, seed_offset: int) -> Population:
    users = split.users
    if users is None:
        if cfg.num_users > len(split.labels):
            raise DataError(f"data.num_users = {cfg.num_users} exceeds the {len(split.labels)} examples")
        users = synthetic_users(split.labels, cfg.partition, cfg.num_users, cfg.dirichlet_alpha,
                                cfg.shards_per_user, cfg.split_seed + seed_offset)
    return Population(split.images, split.labels, users, split.pixel_scale, num_classes)


def _load_splits(cfg) -> DataSplits:
    raw = DATASETS[cfg.name](cfg)
    pool = _population(raw.train, cfg, raw.num_classes, 0)
    rng = np.random.default_rng(cfg.split_seed)
    user_ids = rng.permutation(pool.user_ids)
    n_public = int(round(cfg.public_users * len(user_ids)))
    if raw.test is not None:
        eval_pop = _population(raw.test, cfg, raw.num_classes, 1)
        n_eval = 0
    else:
        n_eval = max(1, int(round(cfg.eval_users * len(user_ids))))
        eval_pop = pool.of_users(user_ids[:n_eval])
    public_ids = user_ids[n_eval:n_eval + n_public]
    train_ids = user_ids[n_eval + n_public:]
    if len(train_ids) == 0:
        raise DataError("no training users left after holding out evaluation and public users")
    train, public = pool.of_users(train_ids), pool.of_users(public_ids) if n_public else None

    held_out = np.asarray(cfg.held_out_classes, dtype=np.int64)
    if len(held_out):
        bad = [int(c) for c in held_out if c < 0 or c >= raw.num_classes]
        if bad:
            raise DataError(f"data.held_out_classes {bad} are not classes of this dataset (0..{raw.num_classes - 1})")
        train = train.select(~np.isin(train.labels, held_out))
        public = public.select(~np.isin(public.labels, held_out)) if public is not None else None
        eval_pop = eval_pop.select(np.isin(eval_pop.labels, held_out))
    if len(eval_pop) > cfg.max_eval_examples:
        keep = np.sort(np.random.default_rng(cfg.split_seed + 2).choice(len(eval_pop), cfg.max_eval_examples,
                                                                         replace=False))
        mask = np.zeros(len(eval_pop), dtype=bool)
        mask[keep] = True
        eval_pop = eval_pop.select(mask)
    if len(eval_pop) < 2:
        raise DataError("the evaluation split has fewer than 2 examples")
    if len(train) == 0:
        raise DataError("the training split is empty")
    return DataSplits(train, eval_pop, public)
