"""Give each device its own data: one .npz per training user of a config (fedemb.deploy.shards).

    .venv/bin/python scripts/deploy/make_shards.py simulations/configs/deploy.toml runs/deploy/shards --devices 3
    .venv/bin/python scripts/deploy/make_shards.py CONFIG OUT --one-file        # users.npz; devices pick user=ID
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedemb.config import load_config
from fedemb.deploy.shards import write_shards
from fedemb.errors import FedembError


def main(config: Annotated[Path, typer.Argument(help="The run's fedemb config (its [data] section).")],
         out: Annotated[Path, typer.Argument(help="Where the device files go.")],
         devices: Annotated[int, typer.Option(help="How many training users (the first N); 0: all.")] = 0,
         one_file: Annotated[bool, typer.Option(help="All users in one users.npz (devices then need user=ID).")] = False,
         override: Annotated[list[str], typer.Option("--override", "-o", help="section.key=value")] = []):
    try:
        manifest = write_shards(load_config(config, override), out, devices, one_file)
    except FedembError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(manifest)} devices' data in {out} ({sum(m['examples'] for m in manifest)} examples)")


if __name__ == "__main__":
    typer.run(main)
