"""The data a device trains on: its own file, named in its SuperNode's node config.

    flower-supernode ... --node-config "data-path='/data/me.npz'"            # the file holds one user
    flower-supernode ... --node-config "data-path='/data/users.npz' user=17" # one of several users

The file is an .npz with x ((n, H, W), (n, H, W, C) or (n, C, H, W); uint8, or float in [0, 1]), y (labels) and
optionally user (one id per row): the format `data.name = "npz"` reads. fedemb.deploy.shards writes one
per device from a config's training users (`fedemb deploy shards`); `fedemb-device data` writes
one from a folder of images. Nothing of it leaves the device but the clipped update of the model trained on it.

Reading and checking a file needs only NumPy: `fedemb-device join` checks it on installs without torch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedemb.data.npz_format import ImageArrays, read_npz
from fedemb.errors import DataError

if TYPE_CHECKING:
    from fedemb.data.population import Population

DATA_PATH = "data-path"
USER = "user"


def read_device_file(file: Path, user: int | None = None) -> ImageArrays:
    """The examples of `user` (or of the file's only user) in a device data file."""
    if not file.is_file():
        raise DataError(f"{file}: no such file on this device")
    data = read_npz(file)
    if data.users is None:  # a file without user ids holds one user
        data = ImageArrays(data.images, data.labels, np.zeros(len(data.labels), dtype=np.int64))
    present = np.unique(data.users)
    if user is None:
        if len(present) != 1:
            raise DataError(f"{file} holds {len(present)} users: say which one this device is with "
                            f"--node-config \"{USER}=ID\"")
        user = int(present[0])
    rows = data.users == user
    if not rows.any():
        raise DataError(f"{file}: no examples of user {user} (the file holds users {present[:5].tolist()}...)")
    return ImageArrays(data.images[rows], data.labels[rows], data.users[rows])


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
def _load(path: str, mtime_ns: int, user: int | None) -> ImageArrays:
    return read_device_file(Path(path), user)
