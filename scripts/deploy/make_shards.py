"""Give each device its own data: one .npz per training user of a config (what a device would hold).

    .venv/bin/python scripts/deploy/make_shards.py simulations/configs/deploy.toml runs/deploy/shards --devices 3
    .venv/bin/python scripts/deploy/make_shards.py CONFIG OUT --one-file        # users.npz; devices pick user=ID

Each file has x, y and user (the npz format of fedemb.deploy.device_data). uint8 images scaled by 1/255
stay uint8; any other scale is written as float32 in [0, 1], so a device needs no dataset metadata.
shards.json lists file, user and example count per device: the --node-config of each SuperNode.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedemb.config import load_config  # noqa: E402
from fedemb.data.population import Population  # noqa: E402
from fedemb.data.splits import load_splits  # noqa: E402
from fedemb.errors import FedembError  # noqa: E402


def device_arrays(pop: Population, users: list[int]) -> dict[str, np.ndarray]:
    rows = np.concatenate([pop.examples_of(u) for u in users])
    images = np.asarray(pop.images[rows])
    if not (images.dtype == np.uint8 and abs(pop.pixel_scale - 1 / 255) < 1e-12):
        images = (images.astype(np.float32) * np.float32(pop.pixel_scale)).clip(0, 1)
    return {"x": images, "y": np.asarray(pop.labels[rows], dtype=np.int64),
            "user": np.asarray(pop.users[rows], dtype=np.int64)}


def main(config: Annotated[Path, typer.Argument(help="The run's fedemb config (its [data] section).")],
         out: Annotated[Path, typer.Argument(help="Where the device files go.")],
         devices: Annotated[int, typer.Option(help="How many training users (the first N); 0: all.")] = 0,
         one_file: Annotated[bool, typer.Option(help="All users in one users.npz (devices then need user=ID).")] = False,
         override: Annotated[list[str], typer.Option("--override", "-o", help="section.key=value")] = []):
    try:
        cfg = load_config(config, override)
        pop = load_splits(cfg.data).train
    except FedembError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    users = [int(u) for u in pop.user_ids]
    if devices:
        if devices > len(users):
            typer.echo(f"error: --devices {devices} but the config has {len(users)} training users", err=True)
            raise typer.Exit(2)
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
    (out / "shards.json").write_text(json.dumps(manifest, indent=1))
    typer.echo(f"{len(users)} devices' data in {out} ({sum(m['examples'] for m in manifest)} examples)")


if __name__ == "__main__":
    typer.run(main)
