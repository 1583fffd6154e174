"""`fedemb privacy`: user-level (ε, δ) of a config or of explicit parameters, and a run's ledger."""

from __future__ import annotations

import json
import math
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
    from fedemb.privacy.accountant import calibrate_accounting_z, epsilon_for
    from fedemb.privacy.sensitivity import (accounting_noise_multiplier, noise_multiplier_for,
                                            sensitivity_in_clip_norms)

    if config is not None or set_:
        from fedemb.run_setup import prepare_run

        cfg = load_run_config(config, set_)
        if target_epsilon is not None:
            cfg.privacy.target_epsilon, cfg.privacy.calibrate_noise = target_epsilon, True
        setup = prepare_run(cfg)
        p = setup.privacy
        n_rounds = cfg.run.rounds
        report = {"epsilon": p.epsilon_after(n_rounds) if cfg.privacy.enabled else math.inf, "delta": p.delta,
                  "noise_multiplier": p.noise_multiplier, "accounting_noise_multiplier": p.accounting_noise_multiplier,
                  "sensitivity_in_clip_norms": p.sensitivity, "sampling_rate": p.sampling_rate, "rounds": n_rounds,
                  "users_per_client": cfg.sampling.users_per_client, "population": setup.population,
                  "accountant": p.accountant}
        if p.projection:
            report |= {f"projected_{k}": v for k, v in p.projection.items()}
    else:
        missing = [name for name, v in (("--sampling-rate", sampling_rate), ("--rounds", rounds), ("--delta", delta))
                   if v is None]
        if noise_multiplier is None and target_epsilon is None:
            missing.append("--noise-multiplier or --target-epsilon")
        if missing:
            raise FedembError(f"without --config, give {', '.join(missing)}")
        if not 0 < sampling_rate <= 1:
            raise FedembError(f"--sampling-rate must be in (0, 1], got {sampling_rate}")
        if rounds < 1 or not 0 < delta < 1 or users_per_client < 1:
            raise FedembError("--rounds must be >= 1, --delta in (0, 1), --users-per-client >= 1")
        if accountant not in ("rdp", "prv"):
            raise FedembError(f"--accountant must be rdp or prv, got {accountant!r}")
        if target_epsilon is not None:
            acc_z = calibrate_accounting_z(accountant, target_epsilon, delta, sampling_rate, rounds)
            noise_multiplier = noise_multiplier_for(acc_z, users_per_client)
        elif noise_multiplier < 0:
            raise FedembError(f"--noise-multiplier must be >= 0, got {noise_multiplier}")
        acc_z = accounting_noise_multiplier(noise_multiplier, users_per_client)
        report = {"epsilon": epsilon_for(accountant, sampling_rate, acc_z, rounds, delta), "delta": delta,
                  "noise_multiplier": noise_multiplier, "accounting_noise_multiplier": acc_z,
                  "sensitivity_in_clip_norms": sensitivity_in_clip_norms(users_per_client),
                  "sampling_rate": sampling_rate, "rounds": rounds, "users_per_client": users_per_client,
                  "accountant": accountant}
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
