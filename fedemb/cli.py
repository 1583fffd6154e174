"""fedemb command line: simulate, pretrain, evaluate, privacy, audit, synth."""

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

app = typer.Typer(
    help="Train image-embedding models with user-level differential privacy (DP-FedEmb) on Flower.\n\n"
         "Start with:  fedemb simulate --config simulations/configs/quickstart.toml",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML run config (see simulations/configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")]


def friendly_errors(fn):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedembError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _load(config: Path | None, overrides: list[str] | None):
    from fedemb.config import load_config

    return load_config(config, overrides or [])


@app.command()
@friendly_errors
def simulate(config: ConfigOpt = None, set_: SetOpt = None,
             run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where to write results (default runs/<name>-<time>).")] = None,
             resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its last checkpoint (its own config.toml and privacy ledger).")] = None,
             ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Run on this existing Ray cluster (e.g. 10.0.0.5:6379, see docs/cluster.md) instead of a local Ray.")] = None,
             verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False):
    """Run DP-FedEmb on Flower's simulation engine (Ray) and write a run directory:
    config.toml, results.json, privacy.json (the privacy ledger), checkpoints/ and TensorBoard logs."""
    from fedemb.federated import check_resume, prepare_run
    from fedemb.run_dir import LEDGER_FILE, new_run_dir
    from fedemb.simulation import run_simulation

    if resume is not None:
        if config is not None or set_ or run_dir is not None:
            raise FedembError("--resume continues a run with its own config: drop --config, --set and --run-dir")
        if not (resume / "config.toml").is_file():
            raise FedembError(f"{resume} is not a run directory (no config.toml)")
        cfg = _load(resume / "config.toml", [])
    else:
        if run_dir is not None and (run_dir / LEDGER_FILE).exists():
            raise FedembError(f"{run_dir} already holds a run ({LEDGER_FILE}): resume it with --resume {run_dir} "
                              "or choose another --run-dir")
        cfg = _load(config, set_)
    setup = prepare_run(cfg)  # fail on bad data or model before anything is written or started
    if resume is not None:
        check_resume(resume, cfg, setup)  # a missing or mismatched ledger: one line, before Ray starts
    out = resume.resolve() if resume is not None else new_run_dir(cfg, str(run_dir) if run_dir else None)
    p = setup.privacy
    err_console.print(f"fedemb: {setup.population} training users, q={cfg.sampling.rate}, k={cfg.sampling.users_per_client}, "
                      f"M={setup.virtual_clients} virtual clients/round, z={p.noise_multiplier:.4g}, C={cfg.privacy.clip_norm}, "
                      f"δ={p.delta:.3g}; run directory {out}{' (resumed)' if resume else ''}", highlight=False)
    results = run_simulation(cfg, out, setup.virtual_clients, verbose=verbose, resume=resume is not None,
                             ray_address=ray_address or "")
    _print_summary(results, out)


def _print_report(report: dict, title: str, as_json: bool) -> None:
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


def _print_summary(results: dict, out: Path) -> None:
    init, final, priv = results["initial"], results["final"], results["privacy"]
    table = Table(title=f"fedemb: {results['rounds_completed']}/{results['rounds_planned']} rounds ({results['stop_reason']})")
    table.add_column("held-out users")
    table.add_column("untrained", justify="right")
    table.add_column("trained", justify="right")
    for key, label in (("recall_at_1", "recall@1"), ("tar_at_far_1e-3", "TAR@FAR=1e-3"), ("tar_at_far_1e-1", "TAR@FAR=1e-1")):
        table.add_row(label, f"{init[key]:.4f}", f"{final[key]:.4f}")
    console.print(table)
    eps = priv["epsilon"]
    eps_text = "∞ (no noise)" if not math.isfinite(float(eps)) else f"{float(eps):.3f}"
    console.print(f"privacy: ε = {eps_text} at δ = {priv['delta']:.3g} (user level, {priv['accountant']}, "
                  f"q = {priv['sampling_rate']}, z = {priv['noise_multiplier']:.4g})", highlight=False)
    if priv.get("projection"):
        pr = priv["projection"]
        console.print(f"projected: ε = {pr['epsilon']:.3f} at δ = {pr['delta']:.3g}, valid only for {pr['valid_for']}",
                      highlight=False)
    console.print(f"results: {out / 'results.json'}", highlight=False)
    console.print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}", highlight=False)
    console.print(f"server-private (exact telemetry, events; never publish): {out / 'private'}", highlight=False)


privacy_app = typer.Typer(help="User-level privacy: ε of a config or of explicit parameters, or a run's ledger.",
                          pretty_exceptions_enable=False, add_completion=False)
app.add_typer(privacy_app, name="privacy")


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
    """User-level (ε, δ) without training: for a config, for explicit
    --sampling-rate --noise-multiplier --rounds --delta, or z for --target-epsilon.
    `fedemb privacy report RUN_DIR` prints a run's privacy ledger."""
    if ctx.invoked_subcommand is not None:
        return
    from fedemb.privacy.accountant import calibrate_accounting_z, epsilon_for
    from fedemb.privacy.sensitivity import (accounting_noise_multiplier, noise_multiplier_for,
                                            sensitivity_in_clip_norms)

    if config is not None or set_:
        from fedemb.federated import prepare_run

        cfg = _load(config, set_)
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
    _print_report(report, "user-level privacy", as_json)


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


@app.command()
@friendly_errors
def evaluate(run: Annotated[Optional[Path], typer.Argument(help="A run directory (uses its config.toml and final checkpoint).")] = None,
             config: ConfigOpt = None, set_: SetOpt = None,
             checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint of backbone + embedding.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
    """Evaluate a checkpoint on the config's held-out users: recall@1 and TAR@FAR (exact, all pairs)."""
    from fedemb.data.splits import load_splits
    from fedemb.evaluation.embed import embed
    from fedemb.evaluation.metrics import embedding_metrics
    from fedemb.models.embedding_net import build_embedding_net, load_checkpoint

    if run is not None:
        config = config or run / "config.toml"
        checkpoint = checkpoint or run / "checkpoints" / "final.pt"
    if checkpoint is None:
        raise FedembError("give a run directory or --checkpoint")
    cfg = _load(config, set_)
    splits = load_splits(cfg.data)
    cfg.model.init_checkpoint = ""
    net = build_embedding_net(cfg.model, splits.eval.image_shape, dp_enabled=False)
    load_checkpoint(net, checkpoint)
    metrics = embedding_metrics(embed(net, splits.eval), splits.eval.labels)
    metrics["examples"] = len(splits.eval)
    metrics["users"] = splits.eval.num_users
    if as_json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            console.print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


@app.command()
@friendly_errors
def pretrain(config: ConfigOpt = None, set_: SetOpt = None,
             out: Annotated[Path, typer.Option(help="Where to write the checkpoint (backbone + embedding state dict).")] = Path("pretrained.pt")):
    """Train centrally, without privacy, on the users declared public (data.public_users) and write a
    checkpoint that `model.init_checkpoint` can start a federated run from."""
    from fedemb.pretrain import pretrain_public

    cfg = _load(config, set_)
    report = pretrain_public(cfg, out)
    console.print(f"pretrained on {report['public_users']} public users ({report['examples']} examples); "
                  f"held-out recall@1 {report['before']['recall_at_1']:.4f} -> {report['after']['recall_at_1']:.4f}; "
                  f"checkpoint {out}", highlight=False)


@app.command()
@friendly_errors
def centralized(config: ConfigOpt = None, set_: SetOpt = None,
                run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where to write results (default runs/<name>-<time>).")] = None):
    """The non-private centralized reference: train the same model on all training users' pooled data
    (a softmax head over all classes, [pretrain] settings) and evaluate it like a federated run."""
    from fedemb.pretrain import train_centralized
    from fedemb.run_dir import new_run_dir

    cfg = _load(config, set_)
    out = new_run_dir(cfg, str(run_dir) if run_dir else None)
    results = train_centralized(cfg, out)
    init, final = results["initial"], results["final"]
    console.print(f"centralized, non-private: {results['examples']} examples, {results['epochs']} epochs; held-out "
                  f"recall@1 {init['recall_at_1']:.4f} -> {final['recall_at_1']:.4f}, TAR@FAR=1e-3 "
                  f"{final['tar_at_far_1e-3']:.4f}; results {out / 'results.json'}", highlight=False)


@app.command()
@friendly_errors
def report(runs: Annotated[list[Path], typer.Argument(help="Run directories, or folders holding them (searched recursively).")],
           out: Annotated[Path, typer.Option(help="Where report.md, the PNG figures and points.json go.")] = Path("docs/results")):
    """Tables and figures from finished runs: utility against ε per method, ablations, synthetic-data
    accuracy against the end-to-end ledger ε, and the privacy ledger per stage. Runs of one grid point
    (experiment.json from scripts/run_experiments.py) are averaged over their seeds."""
    from fedemb.report.writer import write_report

    path = write_report(runs, out)
    console.print(f"report: {path}", highlight=False)


@app.command()
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
    """Empirical privacy audit: insert a canary user into many short runs of the config's real
    mechanism, with and without it, and turn the separation of their scores into an ε lower bound
    (Clopper–Pearson, at --confidence). A lower bound above the claimed ε means the mechanism leaks
    more than it accounts for. If even a perfect separation on these trials could not exceed the
    claim, no run is made and the audit says how many trials would decide.

    Exit codes:
    0 consistent: these trials could have contradicted the claim, and did not;
    1 violation: the lower bound exceeds the claim;
    3 inconclusive: the claim is at or above the largest bound these trials can show;
    2 bad options or config."""
    from rich.progress import Progress

    from fedemb.audit.canary_runs import EXIT_CODES, OTHERS, run_audit

    count = trials if trials == "auto" else int(trials) if trials.isdigit() else 0
    if count == 0 or (count != "auto" and count < 4) or rounds < 1 or not 0 < confidence < 1 or canary_norm <= 0:
        raise FedembError("--trials must be 'auto' or >= 4, --rounds >= 1, --confidence in (0, 1), --canary-norm > 0")
    if others not in OTHERS or max_trials < 4:
        raise FedembError(f"--others must be one of {', '.join(OTHERS)}; --max-trials >= 4")
    cfg = _load(config, set_)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("audit runs", total=None)
        result = run_audit(cfg, trials=count, rounds=rounds, confidence=confidence, canary_norm=canary_norm,
                           seed=seed, others=others, max_trials=max_trials, measure=measure,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    report = result.to_json()
    if out is not None:
        from fedemb.run_dir import write_json

        write_json(out, report)
    _print_report({k: v for k, v in report.items() if not k.endswith("_scores")}, "empirical privacy audit", as_json)
    if not as_json:
        console.print(result.summary(), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_CODES[result.verdict])


from fedemb.synth.commands import synth_app  # noqa: E402  (it uses the helpers above)

app.add_typer(synth_app, name="synth")


# A device install (the base dependencies) lacks what the server-side commands import
FULL_INSTALL_HINT = 'this command needs the full install (pip install "fedemb[all]" / scripts/setup.sh)'
OWN_PACKAGES = ("fedemb", "strategies", "simulations")


def main() -> None:
    import logging

    from fedemb.simulation import offline_flower_environment

    # fedemb's own log lines (such as a seeded run's notice) once each, plain: "WARNING: message"; not
    # through the root logger, which importing Opacus configures with timestamps
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("fedemb").addHandler(handler)
    logging.getLogger("fedemb").propagate = False
    offline_flower_environment()
    try:
        app()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        err_console.print(f"[bold red]error:[/] {escape(FULL_INSTALL_HINT)}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
