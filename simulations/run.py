"""One federated DP-FedEmb run on a Flower Grid: set up, run the strategy, evaluate, write results.

Called by the ServerApp, whether it runs inside `fedemb simulate`, `flwr run .` or a deployment.
A run can be resumed from its run directory (`resume=True`): the latest checkpoints/state.pt and the
privacy ledger continue where they were.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING, getLogger
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedemb.config import Config, to_dict, to_toml
from fedemb.errors import ConfigError
from fedemb.models.embedding_net import shared_state
from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.cohort import CohortWatch, fault_injection_notice, lossy_rounds
from fedemb.monitoring.divergence import DivergenceWatch
from fedemb.monitoring.metric_names import ROUND_TOTALS, TAG_FAULT_INJECTION
from fedemb.monitoring.private_log import PrivateLog
from fedemb.monitoring.progress import ProgressReporter
from fedemb.monitoring.telemetry import TELEMETRY_FILE, PrivateTelemetry, read_telemetry
from fedemb.monitoring.tensorboard import TensorBoardLogger, hparams_entry, round_curves
from fedemb.privacy.clipping import global_norm
from fedemb.privacy.keyed_random import keyed_seed, run_secret
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import make_sampler
from fedemb.run_dir import LEDGER_FILE, PRIVATE_DIR, save_checkpoint, write_json, write_private_json
from fedemb.run_setup import STREAM_TRAINING_KEY, RunSetup, check_resume, prepare_run, privacy_unit
from fedemb.training.client_task import make_task
from simulations.evaluator import Evaluator
from simulations.round_records import Checkpointer, History
from strategies.dp_fedemb import DPFedEmb
from strategies.server_optimizer import make_server_optimizer


def published_constants(cfg: Config, setup: RunSetup, mechanism, server_lr: float) -> dict[str, object]:
    """What a run fixes before it starts and may publish: shown once as text, and in its HParams entry."""
    p = setup.privacy
    fixed = cfg.privacy.enabled and cfg.privacy.clipping == "fixed"
    return {
        "privacy.delta": p.delta,
        "privacy.unit": privacy_unit(setup),
        "privacy.accountant": p.accountant,
        "privacy.mechanism": mechanism.name,
        "privacy.noise_multiplier (z)": p.noise_multiplier,
        "privacy.clipping": cfg.privacy.clipping if cfg.privacy.enabled else "none",
        "privacy.clip_norm (C)": cfg.privacy.clip_norm,  # adaptive clipping: where C starts
        **({"privacy.noise_std (z·C)": p.noise_multiplier * cfg.privacy.clip_norm} if fixed else {}),
        "privacy.sampling_rate (q)": p.sampling_rate,
        "privacy.target_epsilon": p.target_epsilon,
        "sampling.users_per_client (k)": cfg.sampling.users_per_client,
        "virtual clients per round (M)": setup.virtual_clients,
        "server lr in effect": server_lr,  # server.lr, or lower under server.noise_step_limit
        "population": setup.population,
        "noise predictable from run.seed": cfg.run.seed >= 0,
    }


def run_summary(results: dict) -> dict[str, object]:
    """The published end of a run, as the summary text: from results.json, nothing else."""
    privacy = results["privacy"]
    return {
        "rounds": f"{results['rounds_completed']} of {results['rounds_planned']} ({results['stop_reason']})",
        "diverged": "no" if not results["diverged"] else f"round {results['diverged']['round']}: {results['diverged']['reason']}",
        **{f"held-out {k}": f"{results['initial'][k]:.4f} → {v:.4f}" for k, v in results["final"].items()},
        "ε": f"{privacy['epsilon']:.4g}", "δ": f"{privacy['delta']:.3g}", "unit": privacy["unit"],
        "accountant": privacy["accountant"],
    }


def run_federated(grid: Grid, cfg: Config, run_dir: Path, show_progress: bool = True, resume: bool = False,
                  setup: RunSetup | None = None) -> dict:
    """`setup`: what prepare_run(cfg) gave a caller that prepared the run to fail early (fedemb simulate);
    without it (a ServerApp started by Flower) the run is prepared here."""
    started = time.monotonic()
    if setup is None:
        setup = prepare_run(cfg)
    ledger_path = run_dir / LEDGER_FILE
    if resume:
        state, ledger = check_resume(run_dir, cfg, setup)
    elif ledger_path.exists():
        raise ConfigError(f"{run_dir} already holds a run ({LEDGER_FILE}); resume it or choose another run directory")
    else:
        state, ledger = None, PrivacyLedger(ledger_path, setup.privacy.delta, setup.privacy.accountant,
                                             unit=privacy_unit(setup))

    seeded = cfg.run.seed >= 0
    # the server secret keys every draw (sampling, grouping, noise, the training key); 256 bits of OS
    # randomness kept in the server-private state.pt, or derived from run.seed (predictable)
    secret = run_secret(cfg.run.seed) if seeded or not state else state.get("secret", state.get("seed"))
    done_round = int(state["strategy"]["round"]) if state else 0
    # a seeded run replays its releases exactly; otherwise rounds re-run after a crash are new releases
    recorded_after = any((e.round or 0) > done_round for e in ledger.entries)
    attempt = max((e.attempt for e in ledger.entries), default=0) + (0 if seeded or not recorded_after else 1)
    if seeded and cfg.privacy.enabled:
        getLogger("fedemb").warning("run.seed = %s: this run is seeded for reproduction, so its DP noise is predictable "
                                    "from the seed; do not use it for a release (leave run.seed unset)", cfg.run.seed)
    privacy = setup.privacy
    noise = GaussianNoise(privacy.noise_multiplier * cfg.privacy.clip_norm, secret if seeded else None)
    mechanism = make_mechanism(cfg, privacy, noise, setup.virtual_clients)
    sampler = make_sampler(secret, cfg.sampling, setup.virtual_clients)
    task = make_task(cfg, setup.splits.train.num_classes, setup.splits.train.image_shape,
                     keyed_seed(secret, STREAM_TRAINING_KEY))  # a PRF output: reveals nothing of the secret

    initial_state = shared_state(setup.net)
    history = History(state["history"] if state else None)
    evaluator = Evaluator(setup.net, setup.splits)
    tensorboard = TensorBoardLogger(run_dir / "tensorboard", purge_step=done_round + 1 if state else None,
                                    curves=round_curves(cfg.privacy.clipping == "adaptive"),
                                    projector=evaluator.projection)
    initial_eval = state["initial_eval"] if state else dict(evaluator(0, ArrayRecord(initial_state)))
    run_facts = {"secret": secret, "initial_eval": initial_eval, "diverged": state.get("diverged") if state else None}
    telemetry = PrivateTelemetry(run_dir, cfg.monitoring.private_tensorboard, purge_step=done_round + 1 if state else None)
    checkpointer = Checkpointer(run_dir, cfg.run.checkpoint_every, history, run_facts, cfg.run.keep_private_state)
    divergence = DivergenceWatch(global_norm(initial_state), tensorboard.writer, run_facts)
    faults = fault_injection_notice(cfg.simulation.faults, _virtual_clients_per_node(cfg, setup, grid))
    if faults:
        log(WARNING, faults["notice"])
    callbacks: list[RoundCallback] = [tensorboard, telemetry, history, divergence, CohortWatch(), checkpointer]
    if show_progress:
        callbacks.append(ProgressReporter())
    train = setup.splits.train  # a stored or a procedural population: the strategy only indexes its ids
    strategy = DPFedEmb(sampler=sampler, user_ids=train.user_ids, task=task, mechanism=mechanism,
                        server_optimizer=make_server_optimizer(cfg, initial_state, mechanism, setup.virtual_clients),
                        ledger=ledger, target_epsilon=privacy.target_epsilon, attempt=attempt,
                        eval_every=cfg.run.eval_every,
                        callbacks=callbacks, placement=_placement(cfg), user_examples=train.examples_count,
                        min_devices=cfg.deployment.min_devices or cfg.deployment.devices, wait_s=cfg.deployment.wait_s,
                        progress_every_s=cfg.monitoring.wait_progress_s, verify_replays=seeded)
    if state:
        strategy.load_state_dict(state["strategy"])
        start_arrays = ArrayRecord(strategy.server_optimizer.state())
        log(WARNING, "resuming %s after round %s (attempt %s)", run_dir, done_round, attempt)
    else:
        start_arrays = ArrayRecord(initial_state)
        constants = published_constants(cfg, setup, mechanism, strategy.server_optimizer.lr)
        tensorboard.log_run_start(to_toml(cfg), hparams_entry(to_dict(cfg), to_dict(Config()), constants), constants,
                                  evaluator.inputs())
        telemetry.log_training_inputs(train.preview())
        tensorboard.log_eval(0, initial_eval)
        if faults:
            tensorboard.writer.add_text(TAG_FAULT_INJECTION, faults["notice"], 0)
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The strategy's evaluation: round 0's was done above (the initial model), so it is not redone."""
        return MetricRecord(initial_eval) if server_round == 0 else evaluator(server_round, arrays)

    with PrivateLog(run_dir, cfg.monitoring.private_console):
        result = strategy.start(grid, start_arrays, num_rounds=cfg.run.rounds,
                                timeout=cfg.simulation.round_timeout_s, evaluate_fn=evaluate)
    final_state = result.arrays.to_torch_state_dict()
    final = strategy.rounds_completed
    if final not in result.evaluate_metrics_serverapp:
        result.evaluate_metrics_serverapp[final] = evaluator(final, result.arrays)
    final_eval = dict(result.evaluate_metrics_serverapp[final])
    save_checkpoint(run_dir / "checkpoints" / "final.pt", final_state)

    telemetry_rounds = read_telemetry(run_dir)
    totals = {key: int(sum(r.get(key, 0) for r in telemetry_rounds)) for key in ROUND_TOTALS}
    nodes = len(list(grid.get_node_ids()))
    write_private_json(run_dir, "summary.json", {
        "totals": totals, "wall_seconds": time.monotonic() - started, "nodes": nodes,
        "rounds_losing_most_of_their_cohort": lossy_rounds(telemetry_rounds),
        "telemetry": f"{PRIVATE_DIR}/{TELEMETRY_FILE}", "events": f"{PRIVATE_DIR}/events.log"})
    results = {
        "rounds_planned": cfg.run.rounds,
        "rounds_completed": final,
        "stop_reason": strategy.stop_reason or "completed",
        "diverged": divergence.report,  # None, or the round it started, why and what to change
        "fault_injection": faults,  # None, or the injected rates and what to expect of them (data-independent)
        "initial": initial_eval,
        "final": final_eval,
        "server_lr": strategy.server_optimizer.lr,  # in effect: server.lr, or lower (server.noise_step_limit)
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "mechanism": mechanism.name,
            "epsilon": ledger.epsilon,
            "delta": ledger.delta,
            "ledger": LEDGER_FILE,
            "releases": len(ledger.entries),
            "noise_multiplier": privacy.noise_multiplier,
            "accounting_noise_multiplier": privacy.accounting_noise_multiplier,
            "sensitivity_in_clip_norms": privacy.sensitivity,
            "sampling_rate": privacy.sampling_rate,
            "sampling_method": cfg.sampling.method,
            "accountant": privacy.accountant,
            "clip_norm": cfg.privacy.clip_norm if cfg.privacy.enabled else 0.0,
            "final_clip_norm": mechanism.clip_norm,
            "target_epsilon": privacy.target_epsilon,
            "users_per_client": cfg.sampling.users_per_client,
            "virtual_clients_per_round": setup.virtual_clients,
            "population": setup.population,
            "unit": privacy_unit(setup),
            "neighbouring": ledger.relations(ledger.entries),
            "epsilon_by_relation": ledger.epsilon_by_relation(),
            "noise_predictable_from_seed": noise.predictable,
            "projection": privacy.projection,
        },
        **({} if setup.on_devices else {"nodes": nodes}),  # simulation workers: from the resources, not the data
        "simulation_mode": "deployment" if setup.on_devices else cfg.simulation.mode,
        "history": history.rounds,
        "checkpoint": "checkpoints/final.pt",
        "tensorboard": "tensorboard",
        "resumed": bool(resume),
        "server_private": f"{PRIVATE_DIR}/ (exact telemetry, timings and failure counts: never publish)",
    }
    write_json(run_dir / "results.json", results)
    # the results, the ledger and the final model are on disk: what follows is optional and may fail
    tensorboard.project(final)
    failed = tensorboard.warnings + [warning for warning in (
        optional_output("the TensorBoard summary", lambda: tensorboard.log_summary(run_summary(results), final)),
        optional_output("the TensorBoard log", tensorboard.close)) if warning]
    if failed:
        results["warnings"] = failed
        write_json(run_dir / "results.json", results)
    checkpointer.settle(strategy)  # last: a crash before it leaves a state that resumes to these results
    return results


def optional_output(what: str, write: Callable[[], None]) -> str:
    """Run `write`; a failure costs only that output: a warning (returned), never the run's results."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - any failure of an optional output
        warning = f"{what} was not written ({type(exc).__name__}: {exc}); the run's results are complete"
        log(WARNING, warning)
        return warning
    return ""


def _virtual_clients_per_node(cfg: Config, setup: RunSetup, grid: Grid) -> float:
    """The mean number of virtual clients a node trains per round, from M and the nodes alone."""
    if _placement(cfg) == "devices":
        return 1.0
    return setup.virtual_clients / max(1, len(list(grid.get_node_ids())))


def _placement(cfg: Config) -> str:
    if cfg.deployment.devices:
        return "devices"
    return "by_slot" if cfg.simulation.mode == "devices" else "balanced"
