"""`fedemb privacy`: user-level (ε, δ) of a config or of explicit parameters, and a run's ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fedemb.cli.common import ConfigOpt, SetOpt, console, friendly_errors, load_run_config, print_report
from fedemb.errors import FedembError

privacy_app = typer.Typer(help="User-level privacy: ε of a config or of explicit parameters, or a run's ledger.",
                          pretty_exceptions_enable=False, add_completion=False)


@privacy_app.callback(invoke_without_command=True)
@friendly_errors
def privacy(ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = None,
            sampling_rate: Annotated[Optional[float], typer.Option(help="q: probability that a user takes part in a round.")] = None,
            noise_multiplier: Annotated[Optional[float], typer.Option(help="z: noise std / clip norm.")] = None,
            rounds: Annotated[Optional[int], typer.Option(help="Number of rounds.")] = None,
            delta: Annotated[Optional[float], typer.Option(help="δ.")] = None,
            target_epsilon: Annotated[Optional[float], typer.Option(help="Find z for this ε instead.")] = None,
            users_per_client: Annotated[int, typer.Option(help="k: users per virtual client (k > 1 doubles the sensitivity).")] = 8,
            accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
            as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
    """User-level (ε, δ) without training.

    For a config, for explicit --sampling-rate --noise-multiplier --rounds --delta, or z for
    --target-epsilon. `fedemb privacy report RUN_DIR` prints a run's privacy ledger."""
    if ctx.invoked_subcommand is not None:
        return
    from fedemb.cli import api

    if config is not None or set_:
        accounting = api.account(load_run_config(config, set_), target_epsilon=target_epsilon)
    else:
        missing = [name for name, v in (("--sampling-rate", sampling_rate), ("--rounds", rounds), ("--delta", delta))
                   if v is None]
        if noise_multiplier is None and target_epsilon is None:
            missing.append("--noise-multiplier or --target-epsilon")
        if missing:
            raise FedembError(f"without --config, give {', '.join(missing)}")
        accounting = api.account_parameters(sampling_rate=sampling_rate, rounds=rounds, delta=delta,
                                            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                                            users_per_client=users_per_client, accountant=accountant)
    report = accounting.report()
    print_report(report, "user-level privacy", as_json)


@privacy_app.command("report")
@friendly_errors
def privacy_report(run: Annotated[Path, typer.Argument(help="A run directory (reads its privacy.json).")],
                   as_json: Annotated[bool, typer.Option("--json", help="Print the ledger as JSON.")] = False):
    """Every DP release of a run, as a table, and the whole run's (ε, δ) in one line."""
    from fedemb.privacy.report import ledger_rows, load_ledger, summary_lines

    ledger = load_ledger(run)
    if as_json:
        print(json.dumps(ledger.to_json(), default=str))
        return
    table = Table(title=f"privacy ledger: {run}")
    for col in ("stage", "releases", "mechanism", "q", "z", "sensitivity", "ε after"):
        table.add_column(col, justify="left" if col in ("stage", "releases", "mechanism") else "right", overflow="fold")
    for row in ledger_rows(ledger):
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(ledger):  # ε is composed per neighbouring relation: never one mixed ε
        console.print(line, highlight=False)
