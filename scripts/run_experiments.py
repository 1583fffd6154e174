"""Run the cells of experiment specs (scripts/experiments/*.toml), one after another, resumably.

    .venv/bin/python scripts/run_experiments.py scripts/experiments/digits-ablations.toml
    .venv/bin/python scripts/run_experiments.py scripts/experiments/mnist-epsilon.toml \
        --var data=data --var qmnist=/path/to/qmnist [--seeds 0] [--only DP-FedEmb] [--dry-run]
    .venv/bin/fedemb report runs/experiments --out docs/results

A cell whose results.json exists is skipped, and so is an `after` step whose output folder exists: a
killed sweep continues where it stopped. Each run directory gets experiment.json (experiment, group,
grid point, seed, overrides, wall time): what `fedemb report` groups by.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedemb.errors import FedembError  # noqa: E402
from fedemb.experiments import Cell, load_spec  # noqa: E402
from fedemb.run_dir import PRIVATE_DIR, write_json, write_private_json  # noqa: E402


def fedemb_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedemb", *args]


def train_command(cell: Cell) -> list[str]:
    sets = [arg for o in cell.overrides for arg in ("--set", o)]
    return fedemb_command([cell.command, "--config", str(cell.config), *sets, "--run-dir", str(cell.run_dir)])


def step_commands(steps: list[list[str]], run_dir: Path) -> list[tuple[list[str], Path | None]]:
    """Each step's command and the output that marks it done (its --out, if it names one)."""
    out = []
    for args in steps:
        args = [a.replace("{run}", str(run_dir)) for a in args]
        target = Path(args[args.index("--out") + 1]) if "--out" in args[:-1] else None
        out.append((fedemb_command(args), target))
    return out


def run_cell(cell: Cell, log) -> float:
    started = time.monotonic()
    for command, target in step_commands(cell.before, cell.run_dir):
        if target is None or not target.exists():
            _call(command, log)
    if not (cell.run_dir / "results.json").is_file():
        if cell.run_dir.exists():  # a cell killed part-way: seeded, so starting it again gives the same run
            log.write(f"restarting the unfinished {cell.run_dir}\n")
            shutil.rmtree(cell.run_dir)
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(cell.run_dir / "experiment.json", cell.facts)
        _call(train_command(cell), log)
    for command, target in step_commands(cell.after, cell.run_dir):
        if target is not None and target.exists():
            continue
        _call(command, log)
    seconds = time.monotonic() - started
    timing = cell.run_dir / PRIVATE_DIR / "experiment-timing.json"  # run times are server-private
    before = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else 0.0
    write_private_json(cell.run_dir, timing.name, {"wall_seconds": before + seconds})
    return seconds


def _call(command: list[str], log) -> None:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise FedembError(f"`{shlex.join(command[2:])}` failed (exit {done.returncode}); see the log")


def main(specs: Annotated[list[Path], typer.Argument(help="Experiment specs (TOML).")],
         var: Annotated[list[str], typer.Option(help="NAME=VALUE for {NAME} in the specs (e.g. data=data).")] = [],
         runs: Annotated[Path, typer.Option(help="Where the run directories go.")] = Path("runs/experiments"),
         seeds: Annotated[str, typer.Option(help="Comma-separated seeds to run (default: each spec's own).")] = "",
         only: Annotated[list[str], typer.Option(help="Run only these group labels.")] = [],
         dry_run: Annotated[bool, typer.Option(help="Print the commands, run nothing.")] = False):
    try:
        variables = dict(v.split("=", 1) for v in var)
    except ValueError:
        typer.echo("error: --var takes NAME=VALUE", err=True)
        raise typer.Exit(2)
    keep = {int(s) for s in seeds.split(",") if s.strip()} if seeds else None
    try:
        cells = [c for spec in specs for c in load_spec(spec, variables, REPO, runs.resolve()).cells]
    except FedembError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    unknown = set(only) - {c.group for c in cells}
    if unknown:
        typer.echo(f"error: no group named {sorted(unknown)[0]!r} in these specs", err=True)
        raise typer.Exit(2)
    cells = [c for c in cells if (keep is None or c.seed in keep) and (not only or c.group in only)]
    if dry_run:
        for c in cells:
            for command, _ in step_commands(c.before, c.run_dir):
                typer.echo("before: " + shlex.join(command))
            typer.echo(shlex.join(train_command(c)))
            for command, _ in step_commands(c.after, c.run_dir):
                typer.echo("  " + shlex.join(command))
        raise typer.Exit(0)
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / "run_experiments.log", "a") as log:
        for i, cell in enumerate(cells, 1):
            label = f"[{i}/{len(cells)}] {cell.experiment} / {cell.group} / {cell.run_dir.parent.name} / seed {cell.seed}"
            typer.echo(label + " ...")
            try:
                seconds = run_cell(cell, log)
            except FedembError as exc:
                typer.echo(f"error: {label}: {exc}", err=True)
                raise typer.Exit(1)
            typer.echo(f"{label}: {seconds:.0f} s")


if __name__ == "__main__":
    typer.run(main)
