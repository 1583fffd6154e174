"""`fedemb audit`: an empirical lower bound on the mechanism's ε, from canary runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedemb.cli.common import (ConfigOpt, SetOpt, console, err_console, friendly_errors, load_run_config,
                                    print_report)
from fedemb.errors import FedembError


@friendly_errors
def audit(config: ConfigOpt = None, set_: SetOpt = None,
          trials: Annotated[str, typer.Option(help="Short runs per world (with and without the canary), or 'auto': the fewest runs that could contradict the claim.")] = "200",
          rounds: Annotated[int, typer.Option(help="Rounds per short run; the claim is the ε of that many rounds.")] = 1,
          confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = 0.95,
          canary_norm: Annotated[float, typer.Option(help="The canary's update norm, in clip norms (clipping brings it to C).")] = 100.0,
          others: Annotated[str, typer.Option(help="trained: the other virtual clients train as in a run; silent: they send zero updates (audits sampling, clipping, checks and noise at a fraction of the cost).")] = "trained",
          max_trials: Annotated[int, typer.Option(help="Cap on the runs per world of --trials auto.")] = 20_000,
          measure: Annotated[bool, typer.Option("--measure", help="Run the trials even when they cannot contradict the claim (the verdict stays inconclusive; the bound still measures leakage).")] = False,
          seed: Annotated[int, typer.Option(help="Seed of the canary direction and the trials' sampling (the noise is fresh unless run.seed is set).")] = 0,
          out: Annotated[Optional[Path], typer.Option(help="Write the audit (with all scores) as JSON here.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (without the scores).")] = False):
    """Audit the privacy claim empirically: an ε lower bound from canary runs.

    Inserts a canary user into many short runs of the config's real mechanism, with and without it,
    and turns the separation of their scores into an ε lower bound (Clopper–Pearson, at --confidence). A lower bound above the claimed ε means the mechanism leaks
    more than it accounts for. If even a perfect separation on these trials could not exceed the
    claim, no run is made and the audit says how many trials would decide.

    Exit codes:
    0 consistent: these trials could have contradicted the claim, and did not;
    1 violation: the lower bound exceeds the claim;
    3 inconclusive: the claim is at or above the largest bound these trials can show;
    2 bad options or config."""
    from rich.progress import Progress

    from fedemb.audit.verdict import EXIT_CODES
    from simulations.canary_runs import OTHERS, run_audit

    count = trials if trials == "auto" else int(trials) if trials.isdigit() else 0
    if count == 0 or (count != "auto" and count < 4) or rounds < 1 or not 0 < confidence < 1 or canary_norm <= 0:
        raise FedembError("--trials must be 'auto' or >= 4, --rounds >= 1, --confidence in (0, 1), --canary-norm > 0")
    if others not in OTHERS or max_trials < 4:
        raise FedembError(f"--others must be one of {', '.join(OTHERS)}; --max-trials >= 4")
    cfg = load_run_config(config, set_)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("audit runs", total=None)
        result = run_audit(cfg, trials=count, rounds=rounds, confidence=confidence, canary_norm=canary_norm,
                           seed=seed, others=others, max_trials=max_trials, measure=measure,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    report = result.to_json()
    if out is not None:
        from fedemb.run_dir import write_json

        write_json(out, report)
    print_report({k: v for k, v in report.items() if not k.endswith("_scores")}, "empirical privacy audit", as_json)
    if not as_json:
        console.print(result.summary(), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_CODES[result.verdict])
