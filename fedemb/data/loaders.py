"""Dataset loaders by name. Each returns train (and optionally test) arrays, users where known;
load_dataset then brings the images to data.image_size and data.channels (fedemb.data.conform)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from fedemb.data.conform import conformed
from fedemb.data.idx import find_idx, read_idx, read_qmnist_writers
from fedemb.data.image_folder import decoded_images, list_folder, source_files
from fedemb.data.npz_format import checked_images, checked_labels, integer_column, read_npz
from fedemb.data.npz_format import pixel_scale as pixel_scale_of
from fedemb.errors import DataError

log = logging.getLogger("fedemb")


@dataclass
class RawSplit:
    images: np.ndarray  # (n, C, H, W), possibly a memory-mapped view; the store keeps uint8 or float32
    labels: np.ndarray
    users: np.ndarray | None  # None: synthetic users are made by partitioning
    pixel_scale: float
    files: list[Path] = field(default_factory=list)  # where the images come from: keys their conversion


@dataclass
class RawDataset:
    train: RawSplit
    test: RawSplit | None
    num_classes: int
    class_names: dict[int, str] | None = None  # image folders: the name of each class id


def _as_nchw(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x
    raise DataError(f"{source}: images must be (n, H, W) or (n, C, H, W), got shape {x.shape}")


def load_digits_dataset(cfg) -> RawDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # 8x8, values 0..16
    return RawDataset(RawSplit(images, d.target.astype(np.int64), None, 1.0 / 16.0), None, 10)


def load_idx_dataset(cfg) -> RawDataset:
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.path must be a directory with IDX files, got {cfg.path!r}")
    train_file = find_idx(root, "train", "images")
    train_x = _as_nchw(read_idx(train_file), "train images")
    train_y = read_idx(find_idx(root, "train", "labels")).astype(np.int64)
    if len(train_x) != len(train_y):
        raise DataError(f"{root}: {len(train_x)} train images but {len(train_y)} labels")
    train_users = _writers(cfg.writers, train_y) if cfg.writers else None
    test = None
    if cfg.use_test_split:
        test_file = find_idx(root, "t10k", "images")
        test_x = _as_nchw(read_idx(test_file), "t10k images")
        test_y = read_idx(find_idx(root, "t10k", "labels")).astype(np.int64)
        if len(test_x) != len(test_y):
            raise DataError(f"{root}: {len(test_x)} t10k images but {len(test_y)} labels")
        test_users = _writers(cfg.test_writers, test_y) if cfg.test_writers else None
        test = RawSplit(test_x, test_y, test_users, pixel_scale_of(test_x.dtype), [test_file])
    num_classes = int(max(train_y.max(), test.labels.max() if test else 0)) + 1
    train = RawSplit(train_x, train_y, train_users, pixel_scale_of(train_x.dtype), [train_file])
    return RawDataset(train, test, num_classes)


def _writers(path: str, labels: np.ndarray) -> np.ndarray:
    writers, digit = read_qmnist_writers(path, len(labels))
    if not np.array_equal(digit, labels):
        raise DataError(f"{path}: its digit column does not match the image labels (wrong file for this split?)")
    return writers


def load_npz_dataset(cfg) -> RawDataset:
    p = Path(cfg.path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    data = read_npz(p)
    y = data.labels
    return RawDataset(RawSplit(data.images, y, data.users, data.pixel_scale, [p]), None, _num_classes(y))


NPY_FILES = ("x", "y", "user")


def load_npy_dataset(cfg) -> RawDataset:
    """A directory with x.npy, y.npy and optionally user.npy, memory-mapped: populations larger than
    memory go into the store without ever being loaded whole (channels-last x as a transposed view)."""
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.path must be a directory with x.npy, y.npy (and user.npy), got {cfg.path!r}")
    arrays = {name: _open_npy(root, name) for name in NPY_FILES}
    x = checked_images(arrays["x"], str(root / "x.npy"))
    y = checked_labels(arrays["y"], len(x), str(root / "y.npy"))
    users = None
    if arrays["user"] is not None:
        users = integer_column(arrays["user"], len(x), str(root / "user.npy"), "user ids")
    return RawDataset(RawSplit(x, y, users, pixel_scale_of(x.dtype), [root / "x.npy"]), None, _num_classes(y))


def _open_npy(root: Path, name: str) -> np.ndarray | None:
    f = root / f"{name}.npy"
    if not f.is_file():
        if name == "user":
            return None
        raise DataError(f"{root}: missing {name}.npy (need x.npy, y.npy and optionally user.npy)")
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {f}: {exc}") from None


def _num_classes(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if len(labels) else 0


def load_folder_dataset(cfg) -> RawDataset:
    """Image files in class folders (fedemb.data.image_folder), decoded once into a memory-mapped array."""
    listing = list_folder(cfg)
    images = decoded_images(cfg, listing.files)
    log.info("data: %s: %d images of %s; users: %s; classes: %s", cfg.path, len(images),
             "x".join(map(str, images.shape[1:])), listing.users_from,
             ", ".join(f"{i}={name}" for i, name in sorted(listing.class_names.items())))
    return RawDataset(RawSplit(images, listing.labels, listing.users, 1.0 / 255.0), None,
                      int(listing.labels.max()) + 1, listing.class_names)


def load_procedural_base(cfg) -> RawDataset:
    """procedural: the real dataset its users derive from (fedemb.data.procedural generates the users;
    fedemb.data.store.load_splits builds them over this dataset's stored splits)."""
    base = cfg.procedural_base()
    return DATASETS[base.name](base)


DATASETS: dict[str, Callable] = {
    "digits": load_digits_dataset,
    "idx": load_idx_dataset,
    "npz": load_npz_dataset,
    "npy": load_npy_dataset,
    "folder": load_folder_dataset,
    "procedural": load_procedural_base,
}
# formats whose files are not just data.path (or the files directly in it): the store's key stats these
SOURCE_FILES: dict[str, Callable] = {"folder": source_files}


def load_dataset(cfg) -> RawDataset:
    """The dataset `cfg.name` names, its images in the shape data.image_size and data.channels ask for."""
    raw = DATASETS[cfg.name](cfg)
    raw.train = _conformed(raw.train, cfg, "train")
    if raw.test is not None:
        raw.test = _conformed(raw.test, cfg, "test")
    return raw


def _conformed(split: RawSplit, cfg, part: str) -> RawSplit:
    return replace(split, images=conformed(split.images, split.pixel_scale, cfg, split.files, part))
