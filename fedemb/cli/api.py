"""fedemb's Python API, for launcher scripts: what the `fedemb` commands do, one call each, with typed
results (docs/api.md).

    from fedemb.cli import api

    cfg = api.load_config("simulations/configs/quickstart.toml", ["run.rounds=3"])
    for clip in (0.2, 0.4):
        run = api.simulate(api.override(cfg, {"privacy.clip_norm": clip}))
        print(clip, run.final["recall_at_1"], run.epsilon)

The commands in fedemb/cli/ parse their options, call one of these functions and print what it returns.
Bad input raises a fedemb.errors.FedembError (ConfigError, DataError) whose message names the problem in
one line; the command line prints it as `error: ...`. This module belongs to the top layer, with the
commands: it may import the run driver (simulations/); like them, it imports torch, Ray and Flower only
inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedemb.errors import FedembError

if TYPE_CHECKING:
    from fedemb.config import Config
    from fedemb.run_setup import RunSetup

PathLike = str | Path
Overrides = Sequence[str] | Mapping[str, Any]
# progress(phase, step, total, loss): total is None for a phase that only says it has started; loss may be nan
Progress = Callable[[str, int, int | None, float], None]

__all__ = ["Accounting", "DatasetResult", "ReportResult", "RunPlan", "RunResult", "SynthesisResult", "account",
           "account_parameters", "load_config", "override", "report", "resume", "simulate", "synthesize",
           "synthetic_dataset"]


# ------------------------------------------------------------------ config

def load_config(path: PathLike | None = None, overrides: Overrides = ()) -> Config:
    """A validated config: the TOML file at `path` (or the defaults) with `overrides` applied, as
    ``["section.key=value", ...]`` or ``{"section.key": value}``."""
    from fedemb.config import load_config as read

    if isinstance(overrides, Mapping):
        return override(read(path), overrides)
    return read(path, _items(overrides))


def override(cfg: Config, overrides: Overrides) -> Config:
    """A new, validated config: `cfg` with `overrides` applied (`cfg` itself is left as it is)."""
    from fedemb.config import with_overrides

    return with_overrides(cfg, dict(overrides) if isinstance(overrides, Mapping) else _items(overrides))


def _items(overrides: Sequence[str]) -> list[str]:
    return [overrides] if isinstance(overrides, str) else list(overrides)


def _config(cfg: Config | PathLike) -> Config:
    return load_config(cfg) if isinstance(cfg, (str, Path)) else cfg


# ------------------------------------------------------------------ training

@dataclass(frozen=True)
class RunPlan:
    """What a run is about to do, known before its first round (`fedemb simulate` prints it)."""

    run_dir: Path
    population: int  # N: training users (on devices: registered devices)
    sampling_rate: float  # q, as configured (sampling.rate)
    users_per_client: int  # k
    virtual_clients: int  # M: virtual-client slots per round
    noise_multiplier: float  # z
    clip_norm: float  # C (where adaptive clipping starts)
    delta: float
    resumed: bool


@dataclass(frozen=True)
class RunResult:
    """A finished run, as it published itself: read from its results.json and privacy.json."""

    run_dir: Path
    rounds_planned: int
    rounds_completed: int
    stop_reason: str  # completed, or why the run stopped early (its ε budget, too few devices)
    initial: Mapping[str, float]  # held-out metrics of the untrained model (recall_at_1, tar_at_far_1e-3, ...)
    final: Mapping[str, float]  # held-out metrics of the trained model
    epsilon: float  # the training's ε (inf without noise)
    delta: float
    unit: str  # what one neighbouring relation adds or removes: user (device on devices)
    accountant: str
    noise_multiplier: float  # z
    sampling_rate: float  # q as the accountant sees it
    ledger_epsilon: float  # the run ledger's ε now: the training and every synthesis on the run since
    diverged: Mapping[str, Any] | None  # None, or the round training diverged, why and what to change
    resumed: bool
    checkpoint: Path  # the final model (backbone + embedding state dict)
    warnings: tuple[str, ...]  # optional outputs that failed; the results are complete
    results: Mapping[str, Any]  # the whole results.json

    @classmethod
    def read(cls, run_dir: PathLike) -> RunResult:
        """The result of the finished run in `run_dir`."""
        from fedemb.run_dir import LEDGER_FILE

        run_dir = Path(run_dir)
        if not (run_dir / "results.json").is_file():
            raise FedembError(f"{run_dir} holds no finished run (no results.json); resume it if it was interrupted")
        results, ledger = _unfinite(_json(run_dir / "results.json")), _json(run_dir / LEDGER_FILE)
        try:
            privacy = results["privacy"]
            return cls(run_dir=run_dir, rounds_planned=int(results["rounds_planned"]),
                       rounds_completed=int(results["rounds_completed"]), stop_reason=results["stop_reason"],
                       initial=results["initial"], final=results["final"], epsilon=float(privacy["epsilon"]),
                       delta=float(privacy["delta"]), unit=privacy["unit"], accountant=privacy["accountant"],
                       noise_multiplier=float(privacy["noise_multiplier"]), sampling_rate=float(privacy["sampling_rate"]),
                       ledger_epsilon=float(ledger["epsilon"]), diverged=results["diverged"],
                       resumed=bool(results["resumed"]), checkpoint=run_dir / results["checkpoint"],
                       warnings=tuple(results.get("warnings", ())), results=results)
        except (KeyError, TypeError, ValueError) as exc:
            raise FedembError(f"{run_dir}/results.json is not a fedemb run's results ({type(exc).__name__}: {exc})") from None


def simulate(cfg: Config | PathLike, run_dir: PathLike | None = None, *, ray_address: str = "",
             verbose: bool = False, show_progress: bool = True,
             on_start: Callable[[RunPlan], None] | None = None) -> RunResult:
    """Train with DP-FedEmb on Flower's simulation engine (`simulation.engine`: ray, or inprocess) into a
    new run directory: `run_dir`, or runs/<run.name>-<time>. Bad data, model or privacy settings raise
    before anything is written; `on_start` sees the run's plan before its first round."""
    from fedemb.run_dir import LEDGER_FILE, new_run_dir
    from fedemb.run_setup import prepare_run

    if run_dir is not None and (Path(run_dir) / LEDGER_FILE).exists():
        raise FedembError(f"{run_dir} already holds a run ({LEDGER_FILE}): resume it (fedemb simulate --resume "
                          f"{run_dir}) or choose another run directory")
    cfg = _config(cfg)
    setup = prepare_run(cfg)  # fail on bad data or model before anything is written or started
    out = new_run_dir(cfg, str(run_dir) if run_dir is not None else None)
    return _run(setup, out, False, ray_address, verbose, show_progress, on_start)


def resume(run_dir: PathLike, *, ray_address: str = "", verbose: bool = False, show_progress: bool = True,
           on_start: Callable[[RunPlan], None] | None = None) -> RunResult:
    """Continue the run in `run_dir` from its last checkpoint, with its own config.toml and privacy ledger.
    A ledger that is missing or does not match the state raises before anything changes."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FedembError(f"{run_dir} is not a run directory (no config.toml)")
    from fedemb.run_setup import check_resume, prepare_run

    cfg = load_config(run_dir / "config.toml")
    setup = prepare_run(cfg)
    check_resume(run_dir, cfg, setup)  # a missing or mismatched ledger: one line, before Ray starts
    return _run(setup, run_dir.resolve(), True, ray_address, verbose, show_progress, on_start)


def _run(setup: RunSetup, out: Path, resumed: bool, ray_address: str, verbose: bool, show_progress: bool,
         on_start: Callable[[RunPlan], None] | None) -> RunResult:
    from simulations.engine import run_simulation

    cfg, p = setup.cfg, setup.privacy
    if on_start is not None:
        on_start(RunPlan(out, setup.population, cfg.sampling.rate, cfg.sampling.users_per_client,
                         setup.virtual_clients, p.noise_multiplier, cfg.privacy.clip_norm, p.delta, resumed))
    run_simulation(setup, out, verbose=verbose, show_progress=show_progress, resume=resumed, ray_address=ray_address)
    return RunResult.read(out)


# ------------------------------------------------------------------ accounting

@dataclass(frozen=True)
class Accounting:
    """User-level (ε, δ) without training (`fedemb privacy`)."""

    epsilon: float  # after `rounds` rounds (inf without privacy)
    delta: float
    rounds: int
    noise_multiplier: float  # z: noise std / clip norm
    accounting_noise_multiplier: float  # z / sensitivity: what the accountant is told
    sensitivity_in_clip_norms: float  # 1, or 2 for virtual clients of k > 1 users
    sampling_rate: float  # q as the accountant sees it
    users_per_client: int  # k
    accountant: str
    population: int | None = None  # N, from a config
    virtual_clients: int | None = None  # M, from a config
    projection: Mapping[str, Any] | None = None  # privacy.projection: the projected deployment's figures

    def report(self) -> dict[str, Any]:
        """The flat report `fedemb privacy` prints (its --json)."""
        report = {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                  "accounting_noise_multiplier": self.accounting_noise_multiplier,
                  "sensitivity_in_clip_norms": self.sensitivity_in_clip_norms, "sampling_rate": self.sampling_rate,
                  "rounds": self.rounds, "users_per_client": self.users_per_client}
        if self.population is not None:
            report["population"] = self.population
        report["accountant"] = self.accountant
        return report | {f"projected_{k}": v for k, v in (self.projection or {}).items()}


def account(cfg: Config | PathLike, *, target_epsilon: float | None = None) -> Accounting:
    """The (ε, δ) a config's run would spend in its run.rounds rounds, from its data, sampling and noise;
    with `target_epsilon`, the noise multiplier z calibrated for that ε instead of the configured one."""
    from fedemb.run_setup import prepare_run

    cfg = _config(cfg)
    if target_epsilon is not None:
        cfg = override(cfg, {"privacy.target_epsilon": target_epsilon, "privacy.calibrate_noise": True})
    setup = prepare_run(cfg)
    p, rounds = setup.privacy, cfg.run.rounds
    return Accounting(epsilon=p.epsilon_after(rounds) if cfg.privacy.enabled else math.inf, delta=p.delta,
                      rounds=rounds, noise_multiplier=p.noise_multiplier,
                      accounting_noise_multiplier=p.accounting_noise_multiplier, sensitivity_in_clip_norms=p.sensitivity,
                      sampling_rate=p.sampling_rate, users_per_client=cfg.sampling.users_per_client,
                      accountant=p.accountant, population=setup.population, virtual_clients=setup.virtual_clients,
                      projection=p.projection or None)


def account_parameters(*, sampling_rate: float, rounds: int, delta: float, noise_multiplier: float | None = None,
                       target_epsilon: float | None = None, users_per_client: int = 8,
                       accountant: str = "rdp") -> Accounting:
    """The (ε, δ) of explicit parameters, or (with `target_epsilon` instead of `noise_multiplier`) the z
    that reaches that ε."""
    if not 0 < sampling_rate <= 1:
        raise FedembError(f"the sampling rate must be in (0, 1], got {sampling_rate}")
    if rounds < 1 or not 0 < delta < 1 or users_per_client < 1:
        raise FedembError("the rounds must be >= 1, δ in (0, 1), the users per client >= 1")
    if accountant not in ("rdp", "prv"):
        raise FedembError(f"the accountant must be rdp or prv, got {accountant!r}")
    from fedemb.privacy.accountant import calibrate_accounting_z, epsilon_for
    from fedemb.privacy.sensitivity import (accounting_noise_multiplier, noise_multiplier_for,
                                            sensitivity_in_clip_norms)

    if target_epsilon is not None:
        acc_z = calibrate_accounting_z(accountant, target_epsilon, delta, sampling_rate, rounds)
        noise_multiplier = noise_multiplier_for(acc_z, users_per_client)
    elif noise_multiplier is None:
        raise FedembError("give a noise multiplier or a target ε")
    elif noise_multiplier < 0:
        raise FedembError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
    acc_z = accounting_noise_multiplier(noise_multiplier, users_per_client)
    return Accounting(epsilon=epsilon_for(accountant, sampling_rate, acc_z, rounds, delta), delta=delta, rounds=rounds,
                      noise_multiplier=noise_multiplier, accounting_noise_multiplier=acc_z,
                      sensitivity_in_clip_norms=sensitivity_in_clip_norms(users_per_client),
                      sampling_rate=sampling_rate, users_per_client=users_per_client, accountant=accountant)


# ------------------------------------------------------------------ synthesis

@dataclass(frozen=True)
class SynthesisResult:
    """One `fedemb synth` run: its outputs folder and its results JSON, with the headline figures."""

    kind: str  # gmm, invert or custom
    out: Path  # the outputs folder; server-private figures under out/private/
    epsilon: float  # this synthesis's own ε: the stage it released (gmm, invert), per reference image (custom)
    delta: float
    unit: str
    ledger_epsilon: float | None  # the ledger's ε after it, all stages (the run's when there is one); custom: None
    accuracy: float  # gmm: the MLP on the released samples; invert: a fresh model on the images; custom: the user's model
    results: Mapping[str, Any]  # the whole results JSON, and "out"


@dataclass(frozen=True)
class _SynthOptions:
    checkpoint: Path | None
    out: Path | None
    delta: float | None
    epsilons: tuple[float, ...]
    baselines: bool
    embeddings: Path | None
    test_embeddings: Path | None
    task: Path | None
    statistics: Path | None


def synthesize(run_dir: PathLike | None = None, kind: str = "gmm", *, config: Config | PathLike | None = None,
               overrides: Overrides = (), checkpoint: PathLike | None = None, out: PathLike | None = None,
               delta: float | None = None, epsilons: Sequence[float] = (), baselines: bool = True,
               embeddings: PathLike | None = None, test_embeddings: PathLike | None = None,
               task: PathLike | None = None, statistics: PathLike | None = None,
               progress: Progress | None = None) -> SynthesisResult:
    """DP synthetic data from a trained run (its config, final model and privacy ledger; or `config` and
    `checkpoint`), into `out` (default RUN/synth/KIND-TIME, or runs/synth-KIND-TIME).

    kind="gmm": a user-level DP Gaussian mixture of the private embeddings (also from `embeddings` and
    `test_embeddings`, .npz); `epsilons` adds accuracy-vs-ε points, `baselines` the DP-SGD probe and DP
    prototypes. kind="invert": DP activation statistics inverted into images. kind="custom": one user's
    `task` (TOML) from sanitized references, steered by a `statistics` folder of an invert run;
    `baselines` adds the L0-only baseline. Every release is recorded in the ledger before its noise."""
    if kind not in _SYNTHESIS:
        raise FedembError(f"kind must be one of {', '.join(_SYNTHESIS)}, got {kind!r}")
    given = {"epsilons": bool(epsilons), "embeddings": embeddings is not None,
             "test_embeddings": test_embeddings is not None, "task": task is not None,
             "statistics": statistics is not None, "delta": delta is not None}
    for name, kinds in _ONLY_FOR.items():
        if given[name] and kind not in kinds:
            raise FedembError(f"{name} is an option of synthesis kind {' and '.join(kinds)}, not {kind}")
    run, cfg = _run_and_config(run_dir, config, overrides)
    options = _SynthOptions(_path(checkpoint), _path(out), delta, tuple(epsilons), baselines, _path(embeddings),
                            _path(test_embeddings), _path(task), _path(statistics))
    return _SYNTHESIS[kind](run, cfg, options, progress)


def _synthesize_gmm(run: Path | None, cfg: Config, o: _SynthOptions, progress: Progress | None) -> SynthesisResult:
    from fedemb.errors import DataError
    from fedemb.synth.embedded import load_embedded, to_sphere
    from fedemb.synth.from_run import SynthesisData, embed_for_synthesis
    from fedemb.synth.gmm import check_fit_inputs
    from fedemb.synth.pipeline import run_gmm_synthesis

    if o.embeddings is not None or o.test_embeddings is not None:
        if o.embeddings is None or o.test_embeddings is None:
            raise FedembError("--embeddings and --test-embeddings go together")
        private = load_embedded(o.embeddings, cfg.model.embedding_dim if run is not None else None)
        test = load_embedded(o.test_embeddings, private.dim)
        private.x, test.x = to_sphere(private.x), to_sphere(test.x)
        data = SynthesisData(private, test, None, int(max(private.labels.max(), test.labels.max())) + 1)
    else:
        if run is None and o.checkpoint is None:
            raise FedembError("give a run directory, --checkpoint with --config, or --embeddings and --test-embeddings")
        data = embed_for_synthesis(cfg, _checkpoint(run, o.checkpoint))
    if data.test.labels.max() >= data.num_classes:
        raise DataError(f"test labels go up to {data.test.labels.max()}, beyond the {data.num_classes} classes")
    check_fit_inputs(data.private, data.num_classes, cfg.synth, data.public)  # before anything is written

    out = o.out or _default_out(run, "gmm")
    ledger = _open_ledger(run, out, o.delta, cfg, len(set(data.private.users.tolist())))
    points = len(set(o.epsilons) | {cfg.synth.epsilon})
    results = run_gmm_synthesis(data.private, data.test, data.num_classes, cfg.synth, ledger, out, list(o.epsilons),
                                data.public, o.baselines, progress=(lambda i, eps: progress(
                                    f"ε = {eps:g}", i, points, math.nan)) if progress else None)
    return SynthesisResult("gmm", out, results["released"]["epsilon"], results["delta"], results["unit"],
                           results["ledger_epsilon_total"], results["released"]["gmm_mlp_accuracy"],
                           results | {"out": str(out)})


def _synthesize_invert(run: Path | None, cfg: Config, o: _SynthOptions, progress: Progress | None) -> SynthesisResult:
    from fedemb.synth.invert_run import inversion_batches, load_private_model, run_inversion

    model = load_private_model(cfg, _checkpoint(run, o.checkpoint))
    out = o.out or _default_out(run, "invert")
    ledger = _open_ledger(run, out, o.delta, cfg, model.private.num_users)
    steps = cfg.invert.steps * inversion_batches(cfg.invert)[1]
    results = run_inversion(cfg, model, ledger, out, (lambda phase, step, loss: progress(phase, step, steps, loss))
                            if progress else None)
    return SynthesisResult("invert", out, results["released"]["epsilon"], results["delta"], results["unit"],
                           results["ledger_epsilon_total"], results["evaluation"]["inverted"]["from_scratch_accuracy"],
                           results | {"out": str(out)})


def _synthesize_custom(run: Path | None, cfg: Config, o: _SynthOptions, progress: Progress | None) -> SynthesisResult:
    from fedemb.synth.custom import custom_settings
    from fedemb.synth.custom_run import run_custom
    from fedemb.synth.from_run import embedding_centre, load_encoder
    from fedemb.synth.task_spec import load_task

    if o.task is None:
        raise FedembError("--task FILE is required (the task spec, TOML)")
    net, splits = load_encoder(cfg, _checkpoint(run, o.checkpoint))
    spec = load_task(o.task, splits.train.image_shape)  # every check on the task happens before anything leaves
    steps = custom_settings(spec.synthesis, str(o.task)).steps
    out = o.out or _default_out(run, "custom")
    results = run_custom(cfg.model, net, embedding_centre(cfg, net, splits), spec, out, cfg.privacy.accountant,
                         o.statistics, o.baselines, (lambda phase, step, loss: progress(phase, step, steps, loss))
                         if progress else None)
    privacy = results["privacy"]
    return SynthesisResult("custom", out, privacy["epsilon_per_reference_image"], privacy["delta"], privacy["unit"],
                           None, results["customized"]["accuracy"], results | {"out": str(out)})


@dataclass(frozen=True)
class DatasetResult:
    """`fedemb synth dataset`: a labelled synthetic image dataset and its datasheet."""

    out: Path  # images/ (ImageFolder), synthetic.npz, datasheet.md, datasheet.json
    images: int
    stage_epsilon: float  # the dataset's own releases
    end_to_end_epsilon: float  # the ledger's ε after them: training and every release
    delta: float
    unit: str
    accuracy: float | None  # a fresh classifier distilled on the images alone, on held-out users' real images
    datasheet: Mapping[str, Any]


def synthetic_dataset(run_dir: PathLike | None = None, *, epsilon: float | None = None,
                      total_epsilon: float | None = None, out: PathLike | None = None,
                      config: Config | PathLike | None = None, overrides: Overrides = (),
                      checkpoint: PathLike | None = None, delta: float | None = None, evaluate: bool = True,
                      progress: Progress | None = None) -> DatasetResult:
    """A synthetic labelled image dataset from a run, with the best inversion method (the `[invert]`
    settings), its releases recorded in the run's ledger before their noise. The stage spends
    `epsilon`, or the most that keeps the ledger's end-to-end ε within `total_epsilon` (default: the
    config's `invert.epsilon`)."""
    from fedemb.synth.dataset import stage_epsilon_within, write_synthetic_dataset
    from fedemb.synth.invert_run import inversion_batches, load_private_model

    if epsilon is not None and total_epsilon is not None:
        raise FedembError("give --epsilon (this dataset's own) or --total-epsilon (the end-to-end budget), not both")
    for name, value in (("epsilon", epsilon), ("total-epsilon", total_epsilon)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise FedembError(f"--{name} must be finite and > 0, got {value}")
    run, cfg = _run_and_config(run_dir, config, overrides)
    target = Path(out) if out is not None else _default_out(run, "dataset")
    if target.exists() and any(target.iterdir()):
        raise FedembError(f"{target} is not empty: a dataset goes into a new folder")
    ckpt = _checkpoint(run, _path(checkpoint))
    model = load_private_model(cfg, ckpt)
    ledger = _open_ledger(run, target, delta, cfg, model.private.num_users)
    if total_epsilon is not None:
        epsilon = stage_epsilon_within(ledger, total_epsilon)
    if epsilon is not None:
        cfg = override(cfg, {"invert.epsilon": epsilon})
    steps = cfg.invert.steps * inversion_batches(cfg.invert)[1]
    sheet = write_synthetic_dataset(cfg, model, ledger, target, run, ckpt, evaluate,
                                    (lambda phase, step, loss: progress(phase, step, steps, loss)) if progress else None,
                                    {"epsilon": cfg.invert.epsilon if total_epsilon is None else None,
                                     "total_epsilon": total_epsilon})
    p = sheet["privacy"]
    return DatasetResult(target, sheet["composition"]["images"], p["stage_epsilon"], p["end_to_end_epsilon"],
                         p["delta"], p["unit"], sheet["evaluation"]["distilled_accuracy"] if sheet["evaluation"] else None,
                         sheet)


_SYNTHESIS = {"gmm": _synthesize_gmm, "invert": _synthesize_invert, "custom": _synthesize_custom}
_ONLY_FOR = {"epsilons": ("gmm",), "embeddings": ("gmm",), "test_embeddings": ("gmm",), "task": ("custom",),
             "statistics": ("custom",), "delta": ("gmm", "invert")}


def _run_and_config(run_dir: PathLike | None, config: Config | PathLike | None, overrides: Overrides
                    ) -> tuple[Path | None, Config]:
    """The run directory (checked) and its config (or `config`) with `overrides` applied."""
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and not run.is_dir():
        raise FedembError(f"run directory not found: {run}")
    if config is None and run is not None:
        config = run / "config.toml"
    return run, override(_config(config), overrides) if config is not None else load_config(None, overrides)


def _path(p: PathLike | None) -> Path | None:
    return Path(p) if p is not None else None


def _default_out(run: Path | None, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return run / "synth" / f"{kind}-{stamp}" if run is not None else Path("runs") / f"synth-{kind}-{stamp}"


def _checkpoint(run: Path | None, checkpoint: Path | None) -> Path:
    from fedemb.errors import DataError

    checkpoint = checkpoint or (run / "checkpoints" / "final.pt" if run is not None else None)
    if checkpoint is None:
        raise FedembError("give a run directory, or --checkpoint with --config")
    if not checkpoint.is_file():
        raise DataError(f"checkpoint not found: {checkpoint}")
    return checkpoint


def _open_ledger(run: Path | None, out: Path, delta: float | None, cfg: Config, users: int):
    """The run's ledger when there is one (releases compose with training's), else a new one in `out`."""
    from fedemb.privacy.accountant import default_delta
    from fedemb.privacy.ledger import PrivacyLedger
    from fedemb.run_dir import LEDGER_FILE

    if run is not None and (run / LEDGER_FILE).is_file():
        ledger = PrivacyLedger.load(run / LEDGER_FILE)
        if delta is not None and delta != ledger.delta:
            raise FedembError(f"--delta {delta} differs from the run ledger's δ {ledger.delta:.3g}")
        return ledger
    ledger_delta = delta if delta is not None else (cfg.privacy.delta or default_delta(users))
    if not 0 < ledger_delta < 1:
        raise FedembError(f"--delta must be in (0, 1), got {ledger_delta}")
    out.mkdir(parents=True, exist_ok=True)
    return PrivacyLedger(out / LEDGER_FILE, ledger_delta, cfg.privacy.accountant)


# ------------------------------------------------------------------ reports

@dataclass(frozen=True)
class ReportResult:
    """`fedemb report`: tables and figures from finished runs."""

    report: Path  # report.md
    points_file: Path  # points.json: every grid point, averaged over its seeds
    figures: tuple[Path, ...]  # the PNG figures report.md shows
    points: tuple[Mapping[str, Any], ...]  # points.json's points
    runs: tuple[Path, ...]  # the run directories it read


def report(runs: PathLike | Sequence[PathLike], out: PathLike = "docs/results") -> ReportResult:
    """report.md, PNG figures and points.json in `out`, from run directories or folders holding them
    (searched recursively); runs of one grid point (experiment.json) are averaged over their seeds."""
    from fedemb.report.writer import write_report

    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    path = write_report(paths, Path(out))
    points = tuple(_json(path.parent / "points.json")["points"])
    figures = tuple(path.parent / name for name in re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", path.read_text(), re.M))
    return ReportResult(path, path.parent / "points.json", figures, points,
                        tuple(Path(r) for p in points for r in p["runs"]))


def _unfinite(x: Any) -> Any:
    """What fedemb.run_dir.write_json wrote as "inf", "-inf" or "nan" (JSON has none), as floats again."""
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unfinite(v) for v in x]
    return x


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedembError(f"cannot read {path}: {exc}") from None
