"""`fedemb synth ...`: DP synthetic data from a trained run."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from fedemb.cli.common import ConfigOpt, SetOpt, console, err_console, friendly_errors, print_report
from fedemb.errors import FedembError

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


RunArg = Annotated[Optional[Path], typer.Argument(help="A run directory: its config, final checkpoint and privacy ledger.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(help="Backbone + embedding checkpoint (default: the run's final.pt).")]
DeltaOpt = Annotated[Optional[float], typer.Option(help="δ when there is no run ledger (default 1/N^1.1 of the private users).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results JSON.")]


def print_release(results: dict) -> None:
    released = results["released"]
    parts = (["its baselines"] if results.get("baselines") else []) + (
        [f"{len(results['sweep']) - 1} sweep points"] if len(results.get("sweep", [])) > 1 else [])
    others = f", plus {' and '.join(parts)}, each a release of its own" if parts else ""
    console.print(f"released {released['releases']} Gaussian statistics at ε = {released['epsilon']:.3g}{others} "
                  f"(δ = {results['delta']:.3g}); the ledger now holds ε = {results['ledger_epsilon_total']:.3g} "
                  f"in all (was {results['ledger_epsilon_before']:.3g})", highlight=False)


@contextmanager
def optimisation_progress():
    """A rich progress bar per phase; yields the `progress(phase, step, total, loss)` callback of
    fedemb.cli.api.synthesize. Optimisation phases count their steps; training and baseline phases just
    show that they run."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks = {}

        def progress(phase: str, step: int, total: int | None, loss: float) -> None:
            if phase not in tasks:
                counted = not any(word in phase for word in ("training", "baseline"))
                tasks[phase] = bar.add_task(phase, total=total if counted else None, loss="")
            bar.update(tasks[phase], completed=step, loss="" if loss != loss else f"loss {loss:.4g}")
        yield progress


@synth_app.command("gmm")
@friendly_errors
def gmm(run: RunArg = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
        embeddings: Annotated[Optional[Path], typer.Option(help="Private embeddings instead of embedding the config's data: .npz with embeddings, labels, users.")] = None,
        test_embeddings: Annotated[Optional[Path], typer.Option(help="Test embeddings (.npz, same keys), with --embeddings.")] = None,
        delta: DeltaOpt = None,
        epsilons: Annotated[str, typer.Option(help="Comma-separated ε values for the accuracy-vs-ε sweep (synth.epsilon is always one). Every point is a release of its own: the ledger counts each.")] = "",
        baselines: Annotated[bool, typer.Option(help="Also release the DP-SGD probe and DP prototypes at each point's ε (their own ledger stage).")] = True,
        out: Annotated[Optional[Path], typer.Option(help="Output directory (default RUN/synth/gmm-TIME, or runs/synth-gmm-TIME).")] = None,
        as_json: JsonOpt = False):
    """Synthetic embeddings from a user-level DP Gaussian mixture, tested on real ones.

    Fits a user-level DP Gaussian mixture per class to the private embeddings, samples synthetic
    embeddings, trains an MLP on them alone and tests it on real held-out embeddings, next to DP-SGD and
    DP-prototype baselines at the same ε. Every release (mixture, baselines, sweep points) is added to the
    run's privacy ledger; non-private figures go to OUT/private/ only."""
    from rich.progress import Progress

    from fedemb.cli import api

    sweep = parse_epsilons(epsilons)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("release and sweep", total=None)
        result = api.synthesize(run, "gmm", config=config, overrides=set_ or [], checkpoint=checkpoint, out=out,
                                delta=delta, epsilons=sweep, baselines=baselines, embeddings=embeddings,
                                test_embeddings=test_embeddings, progress=lambda phase, step, total, loss: bar.update(
                                    task, completed=step, total=total, description=phase))
    results, out = dict(result.results), result.out
    if as_json:
        print(json.dumps(results, default=str))
        return
    print_release(results)
    rows = {f"ε = {p['epsilon']:g}": " | ".join(f"{m} {p[m]['accuracy']:.3f}"
                                                 for m in ("gmm_mlp", "dpsgd_linear_probe", "dp_prototypes") if m in p)
            for p in results["sweep"]}
    print_report(rows, "accuracy on held-out users", False)
    print_outputs(out, results)


def print_outputs(out: Path, results: dict) -> None:
    console.print(f"outputs in {out}; server-private (not DP, never publish): {out / results['server_private']}",
                  highlight=False)


@synth_app.command("invert")
@friendly_errors
def invert(run: RunArg = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
           delta: DeltaOpt = None,
           out: Annotated[Optional[Path], typer.Option(help="Output directory (default RUN/synth/invert-TIME, or runs/synth-invert-TIME).")] = None,
           as_json: JsonOpt = False):
    """Synthetic images inverted from the private model with DP statistics, tested on real ones.

    Releases DP activation statistics and DP class prototypes of the private data, inverts them into
    images, and trains fresh classifiers on those images alone (hard labels, and distilled from the private
    model), tested on real held-out images next to an ablation without statistics. Settings: the config's invert section."""
    from fedemb.cli import api

    with optimisation_progress() as progress:
        result = api.synthesize(run, "invert", config=config, overrides=set_ or [], checkpoint=checkpoint, out=out,
                                delta=delta, progress=progress)
    results, out = dict(result.results), result.out
    if as_json:
        print(json.dumps(results, default=str))
        return
    print_release(results)
    rows = {f"{name}: from scratch | distilled": f"{e['from_scratch_accuracy']:.3f} | {e['distilled_accuracy']:.3f}"
            for name, e in results["evaluation"].items()}
    refs = results["references"]
    rows["chance"] = f"{refs['chance']:.3f}"
    rows["private model (DP prototypes)"] = f"{refs['private_model_prototype_accuracy']:.3f}"
    print_report(rows, "accuracy on real held-out images", False)
    print_outputs(out, results)


@synth_app.command("dataset")
@friendly_errors
def dataset(run: RunArg = None,
            epsilon: Annotated[Optional[float], typer.Option(help="This dataset's own ε (its releases; default: the config's invert.epsilon).")] = None,
            total_epsilon: Annotated[Optional[float], typer.Option(help="Instead of --epsilon: the end-to-end budget; the dataset spends what keeps the run's ledger within it.")] = None,
            out: Annotated[Optional[Path], typer.Option(help="A new folder for the dataset (default RUN/synth/dataset-TIME).")] = None,
            config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None, delta: DeltaOpt = None,
            evaluate: Annotated[bool, typer.Option(help="Train a fresh classifier on the dataset alone and test it on the held-out users' real images.")] = True,
            as_json: JsonOpt = False):
    """A labelled synthetic image dataset from the private model, with its datasheet.

    Releases DP activation statistics and class anchors (recorded in the run's ledger before their
    noise), inverts them into images and writes OUT/images/CLASS/*.png (torchvision's ImageFolder),
    OUT/synthetic.npz (NumPy: images, labels, soft_labels) and OUT/datasheet.md with provenance and the
    end-to-end ε. Settings: the config's invert section."""
    from fedemb.cli import api

    with optimisation_progress() as progress:
        result = api.synthetic_dataset(run, epsilon=epsilon, total_epsilon=total_epsilon, out=out, config=config,
                                       overrides=set_ or [], checkpoint=checkpoint, delta=delta, evaluate=evaluate,
                                       progress=progress)
    if as_json:
        print(json.dumps(dict(result.datasheet), default=str))
        return
    console.print(f"{result.images} images at ε = {result.stage_epsilon:.3g} for this dataset; end to end "
                  f"(the run's ledger) ε = {result.end_to_end_epsilon:.3g}, δ = {result.delta:.3g} per {result.unit}",
                  highlight=False)
    if result.accuracy is not None:
        console.print(f"a fresh classifier distilled on these images alone: {result.accuracy:.3f} on the held-out "
                      "users' real images", highlight=False)
    console.print(f"dataset in {result.out} (images/, synthetic.npz, datasheet.md)", highlight=False)


Level = Literal["L0", "L1", "L2"]


@synth_app.command("task")
@friendly_errors
def task(dataset: Annotated[Literal["mnist", "digits"], typer.Argument(help="mnist: a NIST writer of MNIST t10k (QMNIST labels, disjoint from the training writers); digits: a random sample of scikit-learn's digits standing in for a user.")],
         out: Annotated[Path, typer.Option(help="The task's folder: task.toml, refs.npz, test.npz.")],
         user: Annotated[int, typer.Option(min=0, help="mnist: the writer with the USER-th most t10k images (0: the most); digits: the sample.")] = 0,
         references: Annotated[int, typer.Option(min=1, help="Reference images per class; the user's other images are the held-out test set.")] = 1,
         foreground: Annotated[Level, typer.Option(help="What leaves the device of the foreground: L0 nothing, L1 outline and edges, L2 the segment.")] = "L1",
         background: Annotated[Level, typer.Option(help="The same for the background.")] = "L0",
         foreground_epsilon: Annotated[float, typer.Option(min=0, help="Share a DP embedding of each foreground at this ε (0: none).")] = 0.0,
         threshold: Annotated[float, typer.Option(help="Foreground = pixels above this intensity, in (0, 1).")] = 0.3,
         seed: Annotated[int, typer.Option(min=-1, help="-1: OS randomness; >= 0 makes the DP embeddings' noise reproducible, and so predictable.")] = -1,
         model: Annotated[Literal["head", "scratch"], typer.Option(help="The user's specialised model: a linear head on the frozen encoder, or the encoder's architecture from scratch.")] = "head",
         mnist: Annotated[Path, typer.Option(help="MNIST's IDX files (mnist).")] = Path("data/mnist"),
         test_writers: Annotated[Optional[Path], typer.Option(help="QMNIST's qmnist-test-labels-idx2-int.gz (mnist).")] = None):
    """Write one real user's customized-synthesis task, for `fedemb synth custom --task OUT/task.toml`.

    The first --references images of each class are the references (foreground: pixels above
    --threshold); the rest of the user's images are the held-out test set, which stays on the device."""
    from fedemb.synth.task_writer import write_user_task

    path = write_user_task(out, dataset, user, references, {"foreground": foreground, "background": background},
                           {"foreground": foreground_epsilon}, threshold, seed,
                           {"model": model} if model != "head" else {}, mnist, test_writers)
    console.print(f"task: {path}", highlight=False)


@synth_app.command("custom")
@friendly_errors
def custom(run: RunArg = None,
           task: Annotated[Optional[Path], typer.Option("--task", help="The task spec (TOML): classes, references, masks or a mask rule, levels.")] = None,
           config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
           statistics: Annotated[Optional[Path], typer.Option(help="A `fedemb synth invert` output: its DP statistics and prototypes steer the synthesis (post-processing).")] = None,
           baseline: Annotated[bool, typer.Option(help="Also synthesize with nothing uploaded (the L0-only baseline).")] = True,
           out: Annotated[Optional[Path], typer.Option(help="Output directory (default RUN/synth/custom-TIME, or runs/synth-custom-TIME).")] = None,
           as_json: JsonOpt = False):
    """Customized synthesis for one user's task, from references sanitized on the device.

    Sanitizes the references on the device (per object L0 nothing, L1 outline and edges, L2 the
    segment; optional DP embeddings), synthesizes on the server from the uploaded payload alone, trains
    a small model on the result and tests it on the user's real held-out
    images against the L0-only baseline, with per-object privacy measures."""
    from fedemb.cli import api

    with optimisation_progress() as progress:
        result = api.synthesize(run, "custom", config=config, overrides=set_ or [], checkpoint=checkpoint, out=out,
                                task=task, statistics=statistics, baselines=baseline, progress=progress)
    results, out = dict(result.results), result.out
    if as_json:
        print(json.dumps(results, default=str))
        return
    levels = ", ".join(f"{o} {lv}" for o, lv in results["levels"].items())
    console.print(f"uploaded {results['uploaded_bytes']} bytes ({levels}); DP embeddings ε = "
                  f"{results['privacy']['epsilon_per_reference_image']:.3g} per reference image", highlight=False)
    rows = {"customized": f"{results['customized']['accuracy']:.3f}"}
    if "l0_baseline" in results:
        rows["L0-only baseline"] = f"{results['l0_baseline']['accuracy']:.3f}"
    rows["chance"] = f"{results['chance']:.3f}"
    for obj, measure in results["privacy"]["objects"].items():
        rows[f"{obj}: pixel MI"] = f"{measure['mi_bits']:.2f} of {measure['raw_entropy_bits']:.2f} bits"
        sim = results["privacy"]["embedding_similarity"][obj]
        rows[f"{obj}: cos(synthetic, raw)"] = f"{sim['synthetic_vs_own_reference']:.3f}"
    print_report(rows, f"task {results['task']}: accuracy on the user's real held-out images", False)
    console.print(f"outputs in {out}", highlight=False)
