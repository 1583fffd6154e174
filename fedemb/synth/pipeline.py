"""`fedemb synth gmm`: release a DP mixture, sample it, train and evaluate a classifier, compare baselines.

The release at `synth.epsilon` is the one written to disk (mixture, synthetic embeddings, classifier)
and recorded in the privacy ledger, composed with whatever the ledger already holds (the training).
The sweep over `--epsilons` is a measurement: each point re-runs every method at that ε on the same
embeddings, and only its accuracies are kept; its releases go to a scratch ledger, not to the run's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import SAMPLED_GAUSSIAN, LedgerEntry, PrivacyLedger
from fedemb.run_dir import write_json
from fedemb.synth.baselines import dp_prototypes, dpsgd_linear_probe, linear_accuracy, prototype_accuracy
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.classifier import accuracy, train_mlp
from fedemb.synth.embedded import Embedded
from fedemb.synth.gmm import ReleasedGMM, fit_dp_gmm

STREAM_NOISE, STREAM_SAMPLES, STREAM_TRAIN, STREAM_PROBE = 21, 22, 23, 24
METHODS = ("gmm_mlp", "dpsgd_linear_probe", "dp_prototypes")


def ledger_recorder(ledger: PrivacyLedger, stage: str, what: str = "the per-cell"
                    ) -> Callable[[str, float, float, dict], None]:
    """Record each Gaussian release (q = 1, one step) in the ledger, which is written before returning."""
    def record(name: str, z: float, sensitivity: float, details: dict) -> None:
        ledger.record(LedgerEntry(
            stage=stage, release=name, mechanism=f"Gaussian noise on {what} {name.split()[-1]}",
            accounting={"kind": SAMPLED_GAUSSIAN, "z": float(z), "q": 1.0, "steps": 1}, unit=ledger.unit,
            noise_multiplier=float(z), sensitivity=float(sensitivity), details=details))
    return record


def next_stage(ledger: PrivacyLedger, name: str) -> str:
    """A fresh stage name per synthesis run, so a second run counts again."""
    taken = {e.stage for e in ledger.entries}
    n = 1
    while f"{name} {n}" in taken:
        n += 1
    return f"{name} {n}"


def gmm_mlp(private: Embedded, test: Embedded, num_classes: int, cfg, z: float, seed: int, record,
            public: Embedded | None) -> tuple[ReleasedGMM, np.ndarray, np.ndarray, torch.nn.Module, float]:
    gmm = fit_dp_gmm(private, num_classes, cfg, z, np.random.default_rng(keyed_seed(seed, STREAM_NOISE)), record,
                     public)
    x, y = gmm.sample(cfg.samples_per_class, np.random.default_rng(keyed_seed(seed, STREAM_SAMPLES)),
                      cfg.project_samples)
    model = train_mlp(x, y, num_classes, cfg.mlp_hidden, cfg.mlp_epochs, cfg.mlp_lr, seed=keyed_seed(seed, STREAM_TRAIN) % 2**31)
    return gmm, x, y, model, accuracy(model, test.x, test.labels)


def evaluate_methods(private: Embedded, test: Embedded, num_classes: int, cfg, epsilon: float, delta: float,
                     accountant: str, seed: int, public: Embedded | None) -> dict:
    """Every method at one ε, on a scratch ledger: accuracy and the ε each one spent."""
    z = stage_noise_multiplier(epsilon, delta, accountant)
    out = {"epsilon": epsilon}
    scratch = PrivacyLedger(None, delta, accountant)
    t = time.perf_counter()
    *_, acc = gmm_mlp(private, test, num_classes, cfg, z, seed, ledger_recorder(scratch, "gmm"), public)
    out["gmm_mlp"] = {"accuracy": acc, "spent_epsilon": scratch.epsilon, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    proto_ledger = PrivacyLedger(None, delta, accountant)
    protos = dp_prototypes(private, num_classes, z, cfg.contribution_bound,
                           np.random.default_rng(keyed_seed(seed, STREAM_NOISE, 1)), ledger_recorder(proto_ledger, "p"))
    out["dp_prototypes"] = {"accuracy": prototype_accuracy(protos, test.x, test.labels),
                            "spent_epsilon": proto_ledger.epsilon, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    probe, spent = dpsgd_linear_probe(private, num_classes, epsilon, delta, accountant, cfg,
                                      keyed_seed(seed, STREAM_PROBE) % 2**31)
    out["dpsgd_linear_probe"] = {"accuracy": linear_accuracy(probe, test.x, test.labels), "spent_epsilon": spent,
                                 "seconds": time.perf_counter() - t}
    return out


def run_gmm_synthesis(private: Embedded, test: Embedded, num_classes: int, cfg, ledger: PrivacyLedger, out: Path,
                      epsilons: list[float], public: Embedded | None = None, progress=None) -> dict:
    """cfg: the `synth` section. Writes the outputs under `out` and returns synth_results.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if cfg.seed >= 0 else secrets.randbits(63)
    delta, accountant = ledger.delta, ledger.accountant
    epsilon_before = ledger.epsilon
    stage = next_stage(ledger, "synthesis/gmm")
    z = stage_noise_multiplier(cfg.epsilon, delta, accountant)
    started = time.perf_counter()
    gmm, x_syn, y_syn, model, acc = gmm_mlp(private, test, num_classes, cfg, z, seed, ledger_recorder(ledger, stage),
                                            public)
    fit_seconds = time.perf_counter() - started
    gmm.save(out / "gmm.npz")
    np.savez(out / "synthetic.npz", embeddings=x_syn, labels=y_syn)
    torch.save(model.state_dict(), out / "classifier.pt")
    stage_entries = [e for e in ledger.entries if e.stage == stage]

    upper = train_mlp(private.x, private.labels, num_classes, cfg.mlp_hidden, cfg.mlp_epochs, cfg.mlp_lr,
                      seed=keyed_seed(seed, STREAM_TRAIN) % 2**31)
    sweep = []
    for i, eps in enumerate(sorted(set(epsilons) | {cfg.epsilon})):
        if progress:
            progress(i, eps)
        sweep.append(evaluate_methods(private, test, num_classes, cfg, eps, delta, accountant, seed, public))
    results = {
        "released": {"stage": stage, "epsilon": ledger.epsilon_of(stage_entries), "target_epsilon": cfg.epsilon,
                     "noise_multiplier": z, "releases": len(stage_entries), "gmm_mlp_accuracy": acc,
                     "seconds": fit_seconds, "synthetic_examples": int(len(x_syn))},
        "delta": delta, "accountant": accountant, "unit": ledger.unit,
        "ledger_epsilon_before": epsilon_before, "ledger_epsilon_total": ledger.epsilon,
        "nonprivate_mlp_accuracy": accuracy(upper, test.x, test.labels),
        "private": {"examples": len(private), "users": int(len(np.unique(private.users))), "dim": private.dim},
        "test": {"examples": len(test), "users": int(len(np.unique(test.users)))},
        "num_classes": num_classes, "sweep": sweep,
        "settings": dict(cfg.__dict__),
    }
    write_json(out / "synth_results.json", results)
    from fedemb.synth.figures import accuracy_plot, projector

    accuracy_plot(results, out / "accuracy_vs_epsilon.png")
    projector(test, x_syn, y_syn, out / "tensorboard", np.random.default_rng(keyed_seed(seed, STREAM_SAMPLES, 1)))
    return results
