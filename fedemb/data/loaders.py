"""Dataset loaders by name. Each returns train (and optionally test) arrays, users where known."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedemb.data.idx import find_idx, read_idx, read_qmnist_writers
from fedemb.data.image_folder import decoded_images, list_folder, source_files
from fedemb.data.npz_format import read_npz
from fedemb.errors import DataError

log = logging.getLogger("fedemb")


@dataclass
class RawSplit:
    images: np.ndarray  # (n, C, H, W)
    labels: np.ndarray
    users: np.ndarray | None  # None: synthetic users are made by partitioning
    pixel_scale: float


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
    train_x = _as_nchw(read_idx(find_idx(root, "train", "images")), "train images")
    train_y = read_idx(find_idx(root, "train", "labels")).astype(np.int64)
    if len(train_x) != len(train_y):
        raise DataError(f"{root}: {len(train_x)} train images but {len(train_y)} labels")
    train_users = _writers(cfg.writers, train_y) if cfg.writers else None
    test = None
    if cfg.use_test_split:
        test_x = _as_nchw(read_idx(find_idx(root, "t10k", "images")), "t10k images")
        test_y = read_idx(find_idx(root, "t10k", "labels")).astype(np.int64)
        if len(test_x) != len(test_y):
            raise DataError(f"{root}: {len(test_x)} t10k images but {len(test_y)} labels")
        test_users = _writers(cfg.test_writers, test_y) if cfg.test_writers else None
        test = RawSplit(test_x, test_y, test_users, _scale(test_x))
    num_classes = int(max(train_y.max(), test.labels.max() if test else 0)) + 1
    return RawDataset(RawSplit(train_x, train_y, train_users, _scale(train_x)), test, num_classes)


def _writers(path: str, labels: np.ndarray) -> np.ndarray:
    writers, digit = read_qmnist_writers(path, len(labels))
    if not np.array_equal(digit, labels):
        raise DataError(f"{path}: its digit column does not match the image labels (wrong file for this split?)")
    return writers


def _scale(x: np.ndarray) -> float:
    return 1.0 / 255.0 if x.dtype == np.uint8 else 1.0


def load_npz_dataset(cfg) -> RawDataset:
    p = Path(cfg.path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    data = read_npz(p)
    y = data.labels
    return RawDataset(RawSplit(data.images, y, data.users, data.pixel_scale), None, int(y.max()) + 1 if len(y) else 0)


def load_npy_dataset(cfg) -> RawDataset:
    """A directory with x.npy, y.npy and optionally user.npy, memory-mapped: populations larger than
    memory go into the store without ever being loaded whole."""
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.path must be a directory with x.npy, y.npy (and user.npy), got {cfg.path!r}")
    arrays = {}
    for name in ("x", "y", "user"):
        f = root / f"{name}.npy"
        if not f.is_file():
            if name == "user":
                continue
            raise DataError(f"{root}: missing {name}.npy (need x.npy, y.npy and optionally user.npy)")
        try:
            arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {f}: {exc}") from None
    x = _as_nchw(arrays["x"], str(root / "x.npy"))
    if x.dtype != np.uint8:
        raise DataError(f"{root}/x.npy: images must be uint8 (got {x.dtype})")
    y = np.asarray(arrays["y"]).astype(np.int64).reshape(-1)
    users = np.asarray(arrays["user"]).astype(np.int64).reshape(-1) if "user" in arrays else None
    if len(y) != len(x) or (users is not None and len(users) != len(x)):
        raise DataError(f"{root}: x, y and user must have the same length")
    if len(y) and y.min() < 0:
        raise DataError(f"{root}: labels must be non-negative")
    return RawDataset(RawSplit(x, y, users, 1.0 / 255.0), None, int(y.max()) + 1 if len(y) else 0)


def load_folder_dataset(cfg) -> RawDataset:
    """Image files in class folders (fedemb.data.image_folder), decoded once into a memory-mapped array."""
    listing = list_folder(cfg)
    images = decoded_images(cfg, listing.files)
    log.info("data: %s: %d images of %s; users: %s; classes: %s", cfg.path, len(images),
             "x".join(map(str, images.shape[1:])), listing.users_from,
             ", ".join(f"{i}={name}" for i, name in sorted(listing.class_names.items())))
    return RawDataset(RawSplit(images, listing.labels, listing.users, 1.0 / 255.0), None,
                      int(listing.labels.max()) + 1, listing.class_names)


DATASETS: dict[str, Callable] = {
    "digits": load_digits_dataset,
    "idx": load_idx_dataset,
    "npz": load_npz_dataset,
    "npy": load_npy_dataset,
    "folder": load_folder_dataset,
}
# formats whose files are not just data.path (or the files directly in it): the store's key stats these
SOURCE_FILES: dict[str, Callable] = {"folder": source_files}
