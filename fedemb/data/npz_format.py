"""Image arrays (x, y and optionally user), read and checked with NumPy alone: the server's
`data.name = "npz"` and `"npy"` and a device's data file (fedemb.deploy.device_data) share these rules.

x is (n, H, W), (n, C, H, W) or channels-last (n, H, W, C) with C in 1, 3, 4: an array is read as
channels-last when its last axis has 1, 3 or 4 entries and its second does not. Pixels are integers in
0..255 (uint8, or any integer type holding such values: pixel / 255) or floats in [0, 1]. y holds
non-negative integer labels, user (optionally) one integer id per image; integral floats (3.0) count as
integers, and a column (n, 1) as a 1-D array.

Every check reads a memory-mapped array in chunks, so an array larger than memory is never loaded whole.
A DataError names the file, the array and the problem in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.errors import DataError

CHANNELS = (1, 3, 4)  # grayscale, RGB, RGBA
LAYOUTS = "(n, H, W), (n, H, W, C) or (n, C, H, W)"
CHUNK_BYTES = 1 << 26  # how much of an image array one check or conversion step reads at a time


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
        return pixel_scale(self.images.dtype)


def pixel_scale(dtype: np.dtype) -> float:
    """What one unit of a checked image array is, as a fraction of full brightness."""
    return 1.0 / 255.0 if np.issubdtype(dtype, np.integer) else 1.0


def stored_dtype(dtype: np.dtype) -> type:
    """The dtype images are kept in once checked: integer pixels (0..255) as uint8, floats as float32."""
    return np.uint8 if np.issubdtype(dtype, np.integer) else np.float32


def chunk_rows(array: np.ndarray) -> int:
    """Rows of `array` per chunk, so that one chunk (also as float32) stays near CHUNK_BYTES."""
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * max(4, array.dtype.itemsize))
    return max(1, CHUNK_BYTES // row_bytes)


def chunks(array: np.ndarray):
    step = chunk_rows(array)
    for start in range(0, len(array), step):
        yield start, array[start:start + step]


def channels_first(x: np.ndarray, where: str) -> np.ndarray:
    """(n, C, H, W) as a view of x (a memory-mapped x stays memory-mapped)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: images must be {LAYOUTS}, got shape {x.shape}")
    if x.shape[3] in CHANNELS and x.shape[1] not in CHANNELS:
        return x.transpose(0, 3, 1, 2)
    if x.shape[1] not in CHANNELS:
        raise DataError(f"{where}: shape {x.shape} has no channel axis: axis 1 (n, C, H, W) or axis 3 "
                        f"(n, H, W, C) must have 1, 3 or 4 entries (grayscale, RGB, RGBA)")
    return x


def check_image_dtype(x: np.ndarray, where: str) -> None:
    numeric = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if not numeric:  # bool, complex, strings, objects
        raise DataError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")


def check_pixel_values(x: np.ndarray, where: str) -> None:
    """Floats finite and in [0, 1], other integers than uint8 in 0..255; read chunk by chunk."""
    if x.dtype == np.uint8 or x.size == 0:
        return
    is_float = np.issubdtype(x.dtype, np.floating)
    low, high = np.inf, -np.inf
    for start, chunk in chunks(x):
        chunk = np.asarray(chunk)
        if is_float and not np.isfinite(chunk).all():
            image = start + int(np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))[0])
            raise DataError(f"{where}: NaN or infinite pixel values (the first in image {image})")
        low, high = min(low, chunk.min().item()), max(high, chunk.max().item())
    if is_float and (low < 0 or high > 1):
        raise DataError(f"{where}: float images must lie in [0, 1], these lie in [{low:g}, {high:g}] "
                        "(store 0..255 pixels as uint8)")
    if not is_float and (low < 0 or high > 255):
        raise DataError(f"{where}: integer images must be pixels in 0..255, these lie in [{low}, {high}] "
                        "(store floats in [0, 1] for other scales)")


def checked_images(x: np.ndarray, where: str) -> np.ndarray:
    """x as a checked (n, C, H, W) view, in its own dtype: stored_dtype says what it becomes."""
    images = channels_first(x, where)
    check_image_dtype(images, where)
    check_pixel_values(images, where)
    return images


def integer_column(values: np.ndarray, n: int, where: str, what: str) -> np.ndarray:
    """One integer per image as (n,) int64: `what` is "labels" or "user ids"."""
    values = np.asarray(values)
    if sum(d != 1 for d in values.shape) > 1:
        raise DataError(f"{where}: {what} must be a 1-D array (one per image), got shape {values.shape}")
    values = values.reshape(-1)
    if len(values) != n:
        raise DataError(f"{where}: {len(values)} {what} for {n} images")
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all() and (values == np.round(values)).all():
        return values.astype(np.int64)
    raise DataError(f"{where}: {what} must be integers, got dtype {values.dtype}"
                    + (" with non-integral or non-finite values" if np.issubdtype(values.dtype, np.floating) else ""))


def checked_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = integer_column(y, n, where, "labels")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where}: labels must be non-negative class ids, got {int(labels.min())}")
    return labels


def array_names(source: str) -> dict[str, str]:
    """How messages name the arrays of one file: 'mine.npz, array x'."""
    return {name: f"{source}, array {name}" for name in ("x", "y", "user")}


def checked_arrays(x: np.ndarray, y: np.ndarray, users: np.ndarray | None, source: str,
                   names: dict[str, str] | None = None) -> ImageArrays:
    """The format's rules, for arrays read or about to be written, converted in memory to uint8 or
    float32; `names` says how messages name x, y and user (default: array_names(source))."""
    names = names or array_names(source)
    images = checked_images(x, names["x"])
    labels = checked_labels(y, len(images), names["y"])
    users = None if users is None else integer_column(users, len(images), names["user"], "user ids")
    return ImageArrays(np.ascontiguousarray(images, dtype=stored_dtype(images.dtype)), labels, users)


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
