"""The data a device trains on: its own file, named in its SuperNode's node config.

    flower-supernode ... --node-config "data-path='/data/me.npz'"            # the file holds one user
    flower-supernode ... --node-config "data-path='/data/users.npz' user=17" # one of several users

The file is an .npz with x ((n, H, W) or (n, C, H, W); uint8, or float in [0, 1]), y (labels) and
optionally user (one id per row): the format `data.name = "npz"` reads. scripts/deploy/make_shards.py
writes one per device from a config's training users; `fedemb-device data` writes one from a folder of
images. Nothing of it leaves the device but the clipped update of the model trained on it.

Reading and checking a file needs only NumPy: `fedemb-device join` checks it on installs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedemb.errors import DataError

if TYPE_CHECKING:
    from fedemb.data.population import Population

DATA_PATH = "data-path"
USER = "user"


@dataclass(frozen=True)
class DeviceData:
    images: np.ndarray  # (n, C, H, W), uint8 or float32 in [0, 1]
    labels: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def pixel_scale(self) -> float:
        return 1.0 / 255.0 if self.images.dtype == np.uint8 else 1.0


def checked_arrays(x: np.ndarray, y: np.ndarray, users: np.ndarray | None, source: str) -> DeviceData:
    """The device format's rules, for a file read or about to be written; a DataError names the problem."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: images must be (n, H, W) or (n, C, H, W), got shape {x.shape}")
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
    users = np.zeros(len(y), dtype=np.int64) if users is None else users.astype(np.int64)
    return DeviceData(x, y.astype(np.int64), users)


def read_device_file(file: Path, user: int | None = None) -> DeviceData:
    """The examples of `user` (or of the file's only user) in a device data file."""
    if not file.is_file():
        raise DataError(f"{file}: no such file on this device")
    try:
        with np.load(file, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile/npy errors come in many types
        raise DataError(f"cannot read .npz file {file}: {exc}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{file}: missing array {key!r} (need x, y and optionally user)")
    data = checked_arrays(arrays["x"], arrays["y"], arrays.get("user"), str(file))
    present = np.unique(data.users)
    if user is None:
        if len(present) != 1:
            raise DataError(f"{file} holds {len(present)} users: say which one this device is with "
                            f"--node-config \"{USER}=ID\"")
        user = int(present[0])
    rows = data.users == user
    if not rows.any():
        raise DataError(f"{file}: no examples of user {user} (the file holds users {present[:5].tolist()}...)")
    return DeviceData(data.images[rows], data.labels[rows], data.users[rows])


def device_population(node_config, image_shape: tuple[int, ...], num_classes: int) -> Population:
    """One user's examples, from the node config; a clear DataError when they cannot serve this run."""
    from fedemb.data.population import Population  # torch: only the ClientApp needs it, not the device CLI

    path = node_config.get(DATA_PATH)
    if not path:
        raise DataError(f"this run trains on devices: start the SuperNode with --node-config \"{DATA_PATH}='FILE.npz'\"")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise DataError(f"{DATA_PATH} {file}: no such file on this device")
    user = node_config.get(USER)
    if user is not None and (isinstance(user, bool) or not isinstance(user, int)):
        raise DataError(f"node config {USER} must be an integer user id, got {user!r}")
    data = _load(str(file.resolve()), file.stat().st_mtime_ns, user)
    if data.image_shape != tuple(image_shape):
        raise DataError(f"{file}: images are {data.image_shape}, this run's model takes {tuple(image_shape)}")
    if len(data.labels) and int(data.labels.max()) >= num_classes:
        raise DataError(f"{file}: label {int(data.labels.max())} is outside this run's {num_classes} classes")
    return Population(data.images, data.labels, data.users, data.pixel_scale, num_classes)


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, user: int | None) -> DeviceData:
    return read_device_file(Path(path), user)
