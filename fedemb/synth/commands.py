"""`fedemb synth ...`: DP synthetic data from a trained run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedemb.cli import ConfigOpt, SetOpt, _load, _print_report, console, err_console, friendly_errors
from fedemb.errors import DataError, FedembError

synth_app = typer.Typer(help="Differentially private synthetic data from the private model.", no_args_is_help=True,
                        pretty_exceptions_enable=False, add_completion=False)


def parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FedembError(f"--epsilons must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not v > 0 or math.isinf(v)]
    if bad:
        raise FedembError(f"--epsilons must all be finite and > 0, got {bad[0]}")
    return values


@synth_app.command("gmm")
@friendly_errors
def gmm(run: Annotated[Optional[Path], typer.Argument(help="A run directory: its config, final checkpoint and privacy ledger.")] = None,
        config: ConfigOpt = None, set_: SetOpt = None,
        checkpoint: Annotated[Optional[Path], typer.Option(help="Backbone + embedding checkpoint (default: the run's final.pt).")] = None,
        embeddings: Annotated[Optional[Path], typer.Option(help="Private embeddings instead of embedding the config's data: .npz with embeddings, labels, users.")] = None,
        test_embeddings: Annotated[Optional[Path], typer.Option(help="Test embeddings (.npz, same keys), with --embeddings.")] = None,
        delta: Annotated[Optional[float], typer.Option(help="δ when there is no run ledger (default 1/N^1.1 of the private users).")] = None,
        epsilons: Annotated[str, typer.Option(help="Comma-separated ε values for the accuracy-vs-ε sweep (synth.epsilon is always one).")] = "",
        out: Annotated[Optional[Path], typer.Option(help="Output directory (default RUN/synth/gmm-TIME, or runs/synth-gmm-TIME).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print synth_results.json.")] = False):
    """Fit a user-level DP Gaussian mixture per class to the private embeddings, sample synthetic
    embeddings, train an MLP on them alone and test it on real held-out embeddings, next to DP-SGD and
    DP-prototype baselines at the same ε. The release is added to the run's privacy ledger."""
    from rich.progress import Progress

    from fedemb.privacy.accountant import default_delta
    from fedemb.privacy.ledger import PrivacyLedger
    from fedemb.run_dir import LEDGER_FILE
    from fedemb.synth.embedded import load_embedded, to_sphere
    from fedemb.synth.from_run import SynthesisData, embed_for_synthesis
    from fedemb.synth.gmm import check_fit_inputs
    from fedemb.synth.pipeline import run_gmm_synthesis

    sweep = parse_epsilons(epsilons)
    if run is not None and not run.is_dir():
        raise FedembError(f"run directory not found: {run}")
    if run is not None:
        config = config or run / "config.toml"
    cfg = _load(config, set_)
    if embeddings is not None or test_embeddings is not None:
        if embeddings is None or test_embeddings is None:
            raise FedembError("--embeddings and --test-embeddings go together")
        dim = cfg.model.embedding_dim if run is not None else None
        private = load_embedded(embeddings, dim)
        test = load_embedded(test_embeddings, private.dim)
        private.x, test.x = to_sphere(private.x), to_sphere(test.x)
        data = SynthesisData(private, test, None, int(max(private.labels.max(), test.labels.max())) + 1)
    else:
        checkpoint = checkpoint or (run / "checkpoints" / "final.pt" if run is not None else None)
        if checkpoint is None:
            raise FedembError("give a run directory, --checkpoint with --config, or --embeddings and --test-embeddings")
        if not Path(checkpoint).is_file():
            raise DataError(f"checkpoint not found: {checkpoint}")
        data = embed_for_synthesis(cfg, checkpoint)
    if data.test.labels.max() >= data.num_classes:
        raise DataError(f"test labels go up to {data.test.labels.max()}, beyond the {data.num_classes} classes")
    check_fit_inputs(data.private, data.num_classes, cfg.synth, data.public)  # before anything is written

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out or (run / "synth" / f"gmm-{stamp}" if run is not None else Path("runs") / f"synth-gmm-{stamp}")
    ledger_path = run / LEDGER_FILE if run is not None and (run / LEDGER_FILE).is_file() else None
    if ledger_path is not None:
        ledger = PrivacyLedger.load(ledger_path)
        if delta is not None and delta != ledger.delta:
            raise FedembError(f"--delta {delta} differs from the run ledger's δ {ledger.delta:.3g}")
    else:
        users = len(set(data.private.users.tolist()))
        ledger_delta = delta if delta is not None else (cfg.privacy.delta or default_delta(users))
        if not 0 < ledger_delta < 1:
            raise FedembError(f"--delta must be in (0, 1), got {ledger_delta}")
        out.mkdir(parents=True, exist_ok=True)
        ledger = PrivacyLedger(out / LEDGER_FILE, ledger_delta, cfg.privacy.accountant)

    points = len(set(sweep) | {cfg.synth.epsilon})
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("release and sweep", total=points)
        results = run_gmm_synthesis(data.private, data.test, data.num_classes, cfg.synth, ledger, out, sweep,
                                    data.public, progress=lambda i, eps: bar.update(task, completed=i,
                                                                                     description=f"ε = {eps:g}"))
    results["out"] = str(out)
    if as_json:
        print(json.dumps(results, default=str))
        return
    released = results["released"]
    console.print(f"released {released['releases']} Gaussian statistics at ε = {released['epsilon']:.3g} "
                  f"(δ = {results['delta']:.3g}); the ledger now holds ε = {results['ledger_epsilon_total']:.3g} "
                  f"in all (was {results['ledger_epsilon_before']:.3g})", highlight=False)
    rows = {f"ε = {p['epsilon']:g}": " | ".join(f"{m} {p[m]['accuracy']:.3f}"
                                                 for m in ("gmm_mlp", "dpsgd_linear_probe", "dp_prototypes"))
            for p in results["sweep"]}
    rows["non-private MLP"] = f"{results['nonprivate_mlp_accuracy']:.3f}"
    _print_report(rows, "test accuracy", False)
    console.print(f"outputs in {out}", highlight=False)
