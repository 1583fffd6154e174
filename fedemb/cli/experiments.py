"""`fedemb experiments run` (the cells of experiment specs, resumably) and `fedemb report` (their results)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedemb.cli.common import app_root, console, err_console, friendly_errors
from fedemb.errors import FedembError

experiments_app = typer.Typer(help="Run experiment specs (scripts/experiments/*.toml): grids of runs and their synthesis, resumably.",
                              no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@experiments_app.command("run")
@friendly_errors
def run(specs: Annotated[list[Path], typer.Argument(help="Experiment specs (TOML).")],
        var: Annotated[list[str], typer.Option(help="NAME=VALUE for {NAME} in the specs (e.g. data=data).")] = [],
        runs: Annotated[Path, typer.Option(help="Where the run directories go.")] = Path("runs/experiments"),
        seeds: Annotated[str, typer.Option(help="Comma-separated seeds to run instead of each spec's own (e.g. to add seeds to a finished sweep).")] = "",
        only: Annotated[list[str], typer.Option(help="Run only these group labels.")] = [],
        dry_run: Annotated[bool, typer.Option(help="Print the commands, run nothing.")] = False,
        warm_ray: Annotated[bool, typer.Option(help="Keep one local Ray running for the sweep's training runs "
                                               "(each joins it with --ray-address) instead of each starting "
                                               "and stopping its own.")] = True):
    """Run the cells of experiment specs one after another, resumably.

    A cell whose results.json exists is skipped, and so is an `after` step whose output folder exists: a
    killed sweep continues where it stopped. Each run directory gets experiment.json (experiment, group,
    grid point, seed, overrides): what `fedemb report` groups by. Commands' output goes to
    RUNS/experiments.log. Exit 1 when a cell fails. The training runs that would each start a local Ray
    share one instead (--no-warm-ray: each starts its own); their results are the same either way."""
    from fedemb.experiment_runner import LOG_FILE, SweepRay, cell_commands, run_cell
    from fedemb.experiments import load_spec

    if any("=" not in v for v in var):
        raise FedembError("--var takes NAME=VALUE")
    variables = dict(v.split("=", 1) for v in var)
    try:
        keep = {int(s) for s in seeds.split(",") if s.strip()} if seeds else None
    except ValueError:
        raise FedembError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    root = app_root()
    chosen = sorted(keep) if keep else None
    cells = [c for spec in specs for c in load_spec(spec, variables, root, runs.resolve(), chosen).cells]
    unknown = set(only) - {c.group for c in cells}
    if unknown:
        raise FedembError(f"no group named {sorted(unknown)[0]!r} in these specs")
    cells = [c for c in cells if not only or c.group in only]
    if dry_run:
        for c in cells:
            for line in cell_commands(c):
                print(line)
        return
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / LOG_FILE, "a") as log, SweepRay(root, warm_ray) as ray:
        for i, cell in enumerate(cells, 1):
            label = f"[{i}/{len(cells)}] {cell.experiment} / {cell.group} / {cell.run_dir.parent.name} / seed {cell.seed}"
            print(label + " ...", flush=True)
            try:
                seconds = run_cell(cell, log, root, ray)
            except FedembError as exc:
                err_console.print(f"[bold red]error:[/] {escape(f'{label}: {exc}')}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            print(f"{label}: {seconds:.0f} s", flush=True)


@friendly_errors
def report(runs: Annotated[list[Path], typer.Argument(help="Run directories, or folders holding them (searched recursively).")],
           out: Annotated[Path, typer.Option(help="Where report.md, the PNG figures and points.json go.")] = Path("docs/results")):
    """Tables and figures from finished runs.

    Utility against ε per method, ablations, DP against noise off (groups with a grid point of ε = ∞),
    synthetic-data accuracy per released condition (repeated releases averaged) with the run's ledger ε
    after all of them, and the privacy ledger per stage. Runs of one grid point (experiment.json from
    `fedemb experiments run`) are averaged over their seeds."""
    from fedemb.cli import api

    console.print(f"report: {api.report(runs, out).report}", highlight=False)
