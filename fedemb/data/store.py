"""The population's data, stored once per machine and memory-mapped by every process that uses it.

The first process that loads a data config (the driver, before any worker starts) writes each split
to a cache directory: `images.npy`, `labels.npy`, `users.npy`, with the training and public rows
sorted by user, plus each split's user index (`user_ids.npy`, `starts.npy`). It builds in a temporary
directory and renames it into place, so a reader never sees half a store. Every process then opens
the arrays with mmap: a worker reads only the rows of the users it trains, nothing is pickled into
messages or contexts, and memory does not grow with the population. Images are kept as uint8 (integer
pixels) or float32, read from the source (a memory-mapped view, possibly channels-last) in chunks.

The directory is keyed by a hash of the data config and of the files it reads (path, size, mtime), so
a changed config or file gets a new store (the files of an image folder: every file under it and its
manifest). Location: fedemb.data.cache (`data.cache_dir`, else $FEDEMB_CACHE_DIR, else ~/.cache/fedemb).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedemb.config import DataConfig
from fedemb.data.cache import cache_root, file_stats, key_of
from fedemb.data.loaders import SOURCE_FILES
from fedemb.data.npz_format import chunk_rows, stored_dtype
from fedemb.data.population import Population
from fedemb.data.splits import DataSplits, plan_splits
from fedemb.errors import DataError

STORE_VERSION = 1
SPLITS = ("train", "eval", "public")


def load_splits(data_cfg) -> DataSplits:
    """Deterministic in the data config: every process that loads it gets the same split, memory-mapped
    from the machine's store (built by the first process that asks)."""
    return _load_splits_cached(json.dumps(data_cfg.model_dump(), sort_keys=True))


@lru_cache(maxsize=4)
def _load_splits_cached(key: str) -> DataSplits:
    cfg = DataConfig(**json.loads(key))
    if cfg.name == "procedural":  # generated users over the base's stored splits, built once per process
        from fedemb.data.procedural import procedural_splits

        return procedural_splits(cfg, load_splits(cfg.procedural_base()))
    return open_store(materialize(cfg))


def _source_files(data_cfg) -> list[Path]:
    files = []
    if data_cfg.name in SOURCE_FILES:
        files += SOURCE_FILES[data_cfg.name](data_cfg)
    elif data_cfg.path:
        p = Path(data_cfg.path)
        files += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    files += [Path(f) for f in (data_cfg.writers, data_cfg.test_writers) if f]
    return files


def store_key(data_cfg) -> str:
    config = {k: v for k, v in data_cfg.model_dump().items() if k != "cache_dir"}
    return key_of({"version": STORE_VERSION, "config": config, "files": file_stats(_source_files(data_cfg))})


def materialize(data_cfg) -> Path:
    """The store directory of this data config, built now if this machine does not have it yet."""
    target = cache_root(data_cfg) / f"{data_cfg.name}-{store_key(data_cfg)}"
    if (target / "meta.json").is_file():
        return target
    plan = plan_splits(data_cfg)  # bad input fails here, before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        raw = plan.raw
        _write_split(tmp / "train", raw.train.images, raw.train.labels, plan.train_users, plan.train_rows, sort=True)
        if plan.public_rows is not None:
            _write_split(tmp / "public", raw.train.images, raw.train.labels, plan.train_users, plan.public_rows,
                         sort=True)
        source = raw.test if raw.test is not None else raw.train
        users = plan.test_users if raw.test is not None else plan.train_users
        _write_split(tmp / "eval", source.images, source.labels, users, plan.eval_rows, sort=False)
        meta = {"version": STORE_VERSION, "num_classes": raw.num_classes, "class_names": raw.class_names,
                "pixel_scale": {"train": raw.train.pixel_scale, "eval": source.pixel_scale,
                                "public": raw.train.pixel_scale},
                "splits": [s for s in SPLITS if (tmp / s).is_dir()]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it meanwhile: theirs is as good as ours
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_split(directory: Path, images, labels, users, rows: np.ndarray, sort: bool) -> None:
    directory.mkdir()
    rows = np.asarray(rows, dtype=np.int64)
    if sort:  # by user, keeping each user's examples in their original order
        rows = rows[np.argsort(users[rows], kind="stable")]
    shape = (len(rows),) + tuple(images.shape[1:])
    out = np.lib.format.open_memmap(directory / "images.npy", mode="w+", dtype=stored_dtype(images.dtype),
                                    shape=shape)
    step = chunk_rows(images)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        out[start:start + len(chunk)] = images[chunk]  # casts: integer pixels were checked to be 0..255
    out.flush()
    del out
    np.save(directory / "labels.npy", np.asarray(labels)[rows].astype(np.int64))
    split_users = np.asarray(users)[rows].astype(np.int64)
    np.save(directory / "users.npy", split_users)
    if sort:
        ids, starts = np.unique(split_users, return_index=True)
        np.save(directory / "user_ids.npy", ids.astype(np.int64))
        np.save(directory / "starts.npy", starts.astype(np.int64))


def _open_split(directory: Path, pixel_scale: float, num_classes: int) -> Population:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("images", "labels", "users")}
    index = None
    if (directory / "user_ids.npy").is_file():
        index = (np.load(directory / "user_ids.npy"), np.load(directory / "starts.npy"))
    return Population(arrays["images"], arrays["labels"], arrays["users"], pixel_scale, num_classes,
                      sorted_index=index)


def open_store(path: Path) -> DataSplits:
    try:
        meta = json.loads((path / "meta.json").read_text())
        splits = {name: _open_split(path / name, meta["pixel_scale"][name], meta["num_classes"])
                  for name in meta["splits"]}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"the data store {path} is damaged ({exc}); delete it and it will be rebuilt") from None
    names = meta.get("class_names")
    return DataSplits(splits["train"], splits["eval"], splits.get("public"),
                      {int(i): n for i, n in names.items()} if names else None)
