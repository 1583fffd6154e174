"""What every command shares: the config options, config loading, one-line errors and report tables."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedemb.errors import FedembError

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML run config (see simulations/configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")]

# The checkout holding pyproject.toml's [tool.flwr.app]: Flower ships this directory as the app, and
# experiment specs name configs relative to it (fedemb is installed editable from it).
APP_ROOT = Path(__file__).resolve().parents[2]


def friendly_errors(fn):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedembError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def load_run_config(config: Path | None, overrides: list[str] | None):
    from fedemb.config import load_config

    return load_config(config, overrides or [])


def app_root() -> Path:
    """APP_ROOT, or a one-line error when fedemb runs from an install without its checkout."""
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise FedembError(f"this command needs the fedemb checkout (pip install -e CHECKOUT); {APP_ROOT} is not one")
    return APP_ROOT


def print_report(report: dict, title: str, as_json: bool) -> None:
    """A flat report as one JSON object (inf as a string) or as a quantity/value table."""
    if as_json:
        print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in report.items()}))
        return
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in report.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    console.print(table)
