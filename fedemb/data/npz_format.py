"""The .npz image format (x, y and optionally user), read and checked with NumPy alone: the server's
`data.name = "npz"` and a device's data file (fedemb.deploy.device_data) share it.

x is (n, H, W), (n, C, H, W) or channels-last (n, H, W, C), uint8 (pixels / 255) or float in [0, 1]; y holds non-negative integer
labels; user, optionally, one integer id per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.errors import DataError


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # (n, C, H, W), uint8 or float32 in [0, 1]
    labels: np.ndarray  # (n,) int64
    users: np.ndarray | None  # (n,) int64; None: the file gives no user ids

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def pixel_scale(self) -> float:
        return 1.0 / 255.0 if self.images.dtype == np.uint8 else 1.0


CHANNELS = (1, 3, 4)  # grayscale, RGB, RGBA


def channels_first(x: np.ndarray, source: str) -> np.ndarray:
    """(n, C, H, W) from (n, H, W), (n, C, H, W) or channels-last (n, H, W, C): an array is taken as
    channels-last when its last axis has 1, 3 or 4 entries and its second does not."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: images must be (n, H, W), (n, H, W, C) or (n, C, H, W), got shape {x.shape}")
    if x.shape[3] in CHANNELS and x.shape[1] not in CHANNELS:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def checked_arrays(x: np.ndarray, y: np.ndarray, users: np.ndarray | None, source: str) -> ImageArrays:
    """The format's rules, for a file read or about to be written; a DataError names the problem."""
    x = channels_first(x, source)
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{source}: images must be uint8 or float in [0, 1], got {x.dtype}")
        x = x.astype(np.float32)
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{source}: float images must lie in [0, 1]")
    y, users = y.reshape(-1), None if users is None else users.reshape(-1)
    for name, values in (("labels", y), ("user ids", users)):
        if values is not None and values.size and not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{source}: {name} must be integers, got {values.dtype}")
    if len(y) != len(x) or (users is not None and len(users) != len(x)):
        raise DataError(f"{source}: x, y and user must have the same length")
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: labels must be non-negative")
    return ImageArrays(x, y.astype(np.int64), None if users is None else users.astype(np.int64))


def read_npz(file: Path) -> ImageArrays:
    """The checked arrays of an .npz file; a DataError names what is wrong with it."""
    try:
        with np.load(file, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile/npy errors come in many types
        raise DataError(f"cannot read .npz file {file}: {exc}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{file}: missing array {key!r} (need x, y and optionally user)")
    return checked_arrays(arrays["x"], arrays["y"], arrays.get("user"), str(file))
