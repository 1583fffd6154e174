"""The data a device trains on: its own file, named in its SuperNode's node config.

    flower-supernode ... --node-config "data-path='/data/me.npz'"            # the file holds one user
    flower-supernode ... --node-config "data-path='/data/users.npz' user=17" # one of several users

The file is an .npz with x ((n, H, W) or (n, C, H, W); uint8, or float in [0, 1]), y (labels) and
optionally user (one id per row): the format `data.name = "npz"` reads. scripts/deploy/make_shards.py
writes one per device from a config's training users. Nothing of it leaves the device but the clipped
update of the model trained on it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fedemb.config import DataConfig
from fedemb.data.loaders import load_npz_dataset
from fedemb.data.population import Population
from fedemb.errors import DataError

DATA_PATH = "data-path"
USER = "user"


def device_population(node_config, image_shape: tuple[int, ...], num_classes: int) -> Population:
    """One user's examples, from the node config; a clear DataError when they cannot serve this run."""
    path = node_config.get(DATA_PATH)
    if not path:
        raise DataError(f"this run trains on devices: start the SuperNode with --node-config \"{DATA_PATH}='FILE.npz'\"")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise DataError(f"{DATA_PATH} {file}: no such file on this device")
    user = node_config.get(USER)
    if user is not None and (isinstance(user, bool) or not isinstance(user, int)):
        raise DataError(f"node config {USER} must be an integer user id, got {user!r}")
    pop = _load(str(file.resolve()), file.stat().st_mtime_ns, user)
    if pop.image_shape != tuple(image_shape):
        raise DataError(f"{file}: images are {pop.image_shape}, this run's model takes {tuple(image_shape)}")
    if len(pop.labels) and int(pop.labels.max()) >= num_classes:
        raise DataError(f"{file}: label {int(pop.labels.max())} is outside this run's {num_classes} classes")
    return Population(pop.images, pop.labels, pop.users, pop.pixel_scale, num_classes)


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, user: int | None) -> Population:
    raw = load_npz_dataset(DataConfig(name="npz", path=path)).train
    users = raw.users if raw.users is not None else np.zeros(len(raw.labels), dtype=np.int64)
    present = np.unique(users)
    if user is None:
        if len(present) != 1:
            raise DataError(f"{path} holds {len(present)} users: say which one this device is with "
                            f"--node-config \"{USER}=ID\"")
        user = int(present[0])
    rows = users == user
    if not rows.any():
        raise DataError(f"{path}: no examples of user {user} (the file holds users {present[:5].tolist()}...)")
    return Population(raw.images[rows], raw.labels[rows], users[rows], raw.pixel_scale, int(raw.labels.max()) + 1)
