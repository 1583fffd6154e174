"""Each device's own data: one .npz per training user of a config (what a device would hold).

Each file has x, y and user (the npz format of fedemb.deploy.device_data). uint8 images scaled by 1/255
stay uint8; any other scale is written as float32 in [0, 1], so a device needs no dataset metadata.
shards.json lists file, user and example count per device: the --node-config of each SuperNode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedemb.config import Config
from fedemb.data.population import Population
from fedemb.data.store import load_splits
from fedemb.errors import ConfigError

MANIFEST = "shards.json"


def device_arrays(pop: Population, users: list[int]) -> dict[str, np.ndarray]:
    rows = np.concatenate([pop.examples_of(u) for u in users])
    images = np.asarray(pop.images[rows])
    if not (images.dtype == np.uint8 and abs(pop.pixel_scale - 1 / 255) < 1e-12):
        images = (images.astype(np.float32) * np.float32(pop.pixel_scale)).clip(0, 1)
    return {"x": images, "y": np.asarray(pop.labels[rows], dtype=np.int64),
            "user": np.asarray(pop.users[rows], dtype=np.int64)}


def write_shards(cfg: Config, out: Path, devices: int = 0, one_file: bool = False) -> list[dict]:
    """The first `devices` training users' data (0: all), one file each or all in users.npz; the manifest."""
    pop = load_splits(cfg.data).train
    users = [int(u) for u in pop.user_ids]
    if devices:
        if devices > len(users):
            raise ConfigError(f"--devices {devices} but the config has {len(users)} training users")
        users = users[:devices]
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    if one_file:
        np.savez(out / "users.npz", **device_arrays(pop, users))
        manifest = [{"file": str((out / "users.npz").resolve()), "user": u, "examples": len(pop.examples_of(u))}
                    for u in users]
    else:
        for u in users:
            file = out / f"user-{u}.npz"
            np.savez(file, **device_arrays(pop, [u]))
            manifest.append({"file": str(file.resolve()), "user": u, "examples": len(pop.examples_of(u))})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
