"""Training and evaluation: `fedemb simulate`, `pretrain`, `centralized` and `evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fedemb.cli.common import ConfigOpt, SetOpt, console, err_console, friendly_errors, load_run_config
from fedemb.errors import FedembError


@friendly_errors
def simulate(config: ConfigOpt = None, set_: SetOpt = None,
             run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where to write results (default runs/<name>-<time>).")] = None,
             resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its last checkpoint (its own config.toml and privacy ledger).")] = None,
             ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Run on this existing Ray cluster (e.g. 10.0.0.5:6379, see docs/cluster.md) instead of a local Ray.")] = None,
             verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False):
    """Train with DP-FedEmb on Flower's simulation engine (Ray).

    Writes a run directory: config.toml, results.json, privacy.json (the privacy ledger), checkpoints/
    and TensorBoard logs."""
    from fedemb.cli import api

    def announce(plan: api.RunPlan) -> None:
        err_console.print(f"fedemb: {plan.population} training users, q={plan.sampling_rate}, k={plan.users_per_client}, "
                          f"M={plan.virtual_clients} virtual clients/round, z={plan.noise_multiplier:.4g}, C={plan.clip_norm}, "
                          f"δ={plan.delta:.3g}; run directory {plan.run_dir}{' (resumed)' if plan.resumed else ''}",
                          highlight=False)

    options = {"ray_address": ray_address or "", "verbose": verbose, "on_start": announce}
    if resume is not None:
        if config is not None or set_ or run_dir is not None:
            raise FedembError("--resume continues a run with its own config: drop --config, --set and --run-dir")
        result = api.resume(resume, **options)
    else:
        result = api.simulate(load_run_config(config, set_), run_dir, **options)
    print_run_summary(dict(result.results), result.run_dir)


def print_run_summary(results: dict, out: Path) -> None:
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
    if results.get("fault_injection"):
        console.print(f"fault injection: {results['fault_injection']['notice']}", highlight=False)
    console.print(f"results: {out / 'results.json'}", highlight=False)
    console.print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}", highlight=False)
    console.print(f"server-private (exact telemetry, events; never publish): {out / 'private'}", highlight=False)


@friendly_errors
def evaluate(run: Annotated[Optional[Path], typer.Argument(help="A run directory (uses its config.toml and final checkpoint).")] = None,
             config: ConfigOpt = None, set_: SetOpt = None,
             checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint of backbone + embedding.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
    """Evaluate a checkpoint on the config's held-out users: recall@1 and TAR@FAR (exact, all pairs)."""
    from fedemb.data.store import load_splits
    from fedemb.evaluation.embed import embed
    from fedemb.evaluation.metrics import embedding_metrics
    from fedemb.models.embedding_net import build_embedding_net, load_checkpoint

    if run is not None:
        config = config or run / "config.toml"
        checkpoint = checkpoint or run / "checkpoints" / "final.pt"
    if checkpoint is None:
        raise FedembError("give a run directory or --checkpoint")
    cfg = load_run_config(config, set_)
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


@friendly_errors
def pretrain(config: ConfigOpt = None, set_: SetOpt = None,
             out: Annotated[Path, typer.Option(help="Where to write the checkpoint (backbone + embedding state dict).")] = Path("pretrained.pt")):
    """Pretrain centrally, without privacy, on the public users.

    Trains on the users declared public (data.public_users) and writes a checkpoint that
    `model.init_checkpoint` can start a federated run from."""
    from fedemb.pretrain import pretrain_public

    cfg = load_run_config(config, set_)
    report = pretrain_public(cfg, out)
    console.print(f"pretrained on {report['public_users']} public users ({report['examples']} examples); "
                  f"held-out recall@1 {report['before']['recall_at_1']:.4f} -> {report['after']['recall_at_1']:.4f}; "
                  f"checkpoint {out}", highlight=False)


@friendly_errors
def centralized(config: ConfigOpt = None, set_: SetOpt = None,
                run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where to write results (default runs/<name>-<time>).")] = None):
    """Train the non-private centralized reference.

    Trains the same model on all training users' pooled data (a softmax head over all classes, the
    pretrain section's settings) and evaluates it like a federated run."""
    from fedemb.pretrain import train_centralized
    from fedemb.run_dir import new_run_dir

    cfg = load_run_config(config, set_)
    out = new_run_dir(cfg, str(run_dir) if run_dir else None)
    results = train_centralized(cfg, out)
    init, final = results["initial"], results["final"]
    console.print(f"centralized, non-private: {results['examples']} examples, {results['epochs']} epochs; held-out "
                  f"recall@1 {init['recall_at_1']:.4f} -> {final['recall_at_1']:.4f}, TAR@FAR=1e-3 "
                  f"{final['tar_at_far_1e-3']:.4f}; results {out / 'results.json'}", highlight=False)
