"""`fedemb synth gmm`: release a DP mixture, sample it, train and evaluate a classifier, compare baselines.

Every point is a set of releases in the ledger (fedemb.privacy.release), each drawing its own noise:
the mixture at `synth.epsilon` in stage `synthesis/gmm N`, every other ε of the sweep in
`synthesis/gmm N sweep ε=E`, and each point's baselines (DP prototypes, the DP-SGD probe, at the same
ε) in the point's `baselines` stage. The mixture at `synth.epsilon` is the one written to disk
(mixture, synthetic embeddings, classifier).

What is published (synth_results.json, the console, the plot, TensorBoard) is those releases, their
post-processing evaluated on the held-out users (a separate population, never trained on), and
data-independent facts. The rest is server-private, in OUT/private/: the non-private MLP trained on the
private embeddings, the private set's sizes, timings.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.privacy.streams import STREAM_GMM_MLP, STREAM_GMM_SAMPLES, STREAM_GMM_START
from fedemb.run_dir import write_json, write_private_json
from fedemb.synth.adaptive_gmm import fit_mixture
from fedemb.synth.baselines import (PROBE_RELEASE, dp_prototypes, dpsgd_linear_probe, linear_accuracy,
                                    prototype_accuracy)
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.classifier import accuracy, train_mlp
from fedemb.synth.embedded import Embedded
from fedemb.synth.gmm import ReleasedGMM

METHODS = ("gmm_mlp", "dpsgd_linear_probe", "dp_prototypes")
PRIVATE_FILE = "synth_private.json"
HELD_OUT = ("accuracies are measured on held-out users, a population separate from the private training "
            "users and never trained on: post-processing of the releases")


@dataclass
class Fitted:
    gmm: ReleasedGMM
    x: np.ndarray  # synthetic embeddings
    y: np.ndarray
    model: torch.nn.Module  # the MLP trained on them


def gmm_mlp(private: Embedded, test: Embedded, num_classes: int, cfg, z: float, seed: int, stage: LedgerStage,
            public: Embedded | None) -> tuple[Fitted, float]:
    """The mixture released into `stage`; the rest (samples, MLP, its test accuracy) is post-processing."""
    gmm = fit_mixture(private, num_classes, cfg, z, stage, np.random.default_rng(keyed_seed(seed, STREAM_GMM_START)),
                     public)
    x, y = gmm.sample(cfg.samples_per_class, np.random.default_rng(keyed_seed(seed, STREAM_GMM_SAMPLES)),
                      cfg.project_samples)
    model = train_mlp(x, y, num_classes, cfg.mlp_hidden, cfg.mlp_epochs, cfg.mlp_lr,
                      seed=keyed_seed(seed, STREAM_GMM_MLP) % 2**31)
    return Fitted(gmm, x, y, model), accuracy(model, test.x, test.labels)


def release_point(private: Embedded, test: Embedded, num_classes: int, cfg, epsilon: float, stage: LedgerStage,
                  seed: int, public: Embedded | None, baselines: bool = True) -> tuple[dict, Fitted, dict]:
    """Every method at one ε, each a release of its own: the mixture into `stage`, the baselines into its
    `baselines` stage. Returns the point's public figures (accuracy, stage, ε spent per method), the
    fitted mixture, and the seconds each method took (server-private)."""
    ledger = stage.ledger
    z = stage_noise_multiplier(epsilon, ledger.delta, ledger.accountant)
    started = time.perf_counter()
    fitted, acc = gmm_mlp(private, test, num_classes, cfg, z, seed, stage, public)
    point = {"epsilon": epsilon, "gmm_mlp": {"accuracy": acc, "stage": stage.name, "spent_epsilon": stage.epsilon}}
    seconds = {"gmm_mlp": time.perf_counter() - started}
    if baselines:
        side = stage.sub("baselines")
        started = time.perf_counter()
        protos = dp_prototypes(private, num_classes, z, cfg.contribution_bound, side)
        point["dp_prototypes"] = {"accuracy": prototype_accuracy(protos, test.x, test.labels), "stage": side.name,
                                  "spent_epsilon": _epsilon_of(side, "prototype sums")}
        seconds["dp_prototypes"] = time.perf_counter() - started
        started = time.perf_counter()
        probe, opacus_epsilon = dpsgd_linear_probe(private, num_classes, epsilon, cfg, side)
        point["dpsgd_linear_probe"] = {"accuracy": linear_accuracy(probe, test.x, test.labels), "stage": side.name,
                                       "spent_epsilon": _epsilon_of(side, PROBE_RELEASE),
                                       "opacus_epsilon": opacus_epsilon}
        seconds["dpsgd_linear_probe"] = time.perf_counter() - started
    return point, fitted, seconds


def _epsilon_of(stage: LedgerStage, release: str) -> float:
    return stage.ledger.epsilon_of([e for e in stage.entries if e.release == release])


def run_gmm_synthesis(private: Embedded, test: Embedded, num_classes: int, cfg, ledger: PrivacyLedger, out: Path,
                      epsilons: list[float], public: Embedded | None = None, baselines: bool = True,
                      progress=None) -> dict:
    """cfg: the `synth` section. Writes the outputs under `out` and returns synth_results.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if cfg.seed >= 0 else secrets.randbits(63)  # post-processing: sampling, training
    noise = NoiseSource(cfg.seed if cfg.seed >= 0 else None)
    epsilon_before = ledger.epsilon
    stage = LedgerStage.new(ledger, "synthesis/gmm", noise)
    others = sorted(set(epsilons) - {cfg.epsilon})
    sweep, seconds = [], {}
    for i, eps in enumerate([cfg.epsilon, *others]):  # the release first: its stage name is then taken
        if progress:
            progress(i, eps)
        point_stage = stage if i == 0 else stage.sub(f"sweep ε={eps!r}")
        point, fitted, seconds[f"{eps:g}"] = release_point(private, test, num_classes, cfg, eps, point_stage, seed,
                                                           public, baselines)
        sweep.append(point)
        if i == 0:
            released, released_accuracy = fitted, point["gmm_mlp"]["accuracy"]
    released.gmm.save(out / "gmm.npz")
    np.savez(out / "synthetic.npz", embeddings=released.x, labels=released.y)
    torch.save(released.model.state_dict(), out / "classifier.pt")

    upper = train_mlp(private.x, private.labels, num_classes, cfg.mlp_hidden, cfg.mlp_epochs, cfg.mlp_lr,
                      seed=keyed_seed(seed, STREAM_GMM_MLP) % 2**31)
    private_file = write_private_json(out, PRIVATE_FILE, {
        "what": "not DP: figures computed on the private embeddings themselves; never publish",
        "nonprivate_mlp_accuracy": accuracy(upper, test.x, test.labels),
        "private_set": {"examples": len(private), "users": int(len(np.unique(private.users)))},
        "seconds": seconds})
    results = {
        "released": {"stage": stage.name, "epsilon": stage.epsilon, "target_epsilon": cfg.epsilon,
                     "noise_multiplier": stage_noise_multiplier(cfg.epsilon, ledger.delta, ledger.accountant),
                     "releases": len(stage.entries), "gmm_mlp_accuracy": released_accuracy,
                     "synthetic_examples": int(len(released.x)), "noise_predictable_from_seed": noise.predictable},
        "baselines": {"stage": stage.sub("baselines").name,
                      "epsilon": stage.sub("baselines").epsilon} if baselines else None,
        "delta": ledger.delta, "accountant": ledger.accountant, "unit": ledger.unit,
        "ledger_epsilon_before": epsilon_before, "ledger_epsilon_total": ledger.epsilon,
        "dim": private.dim, "test": {"examples": len(test), "users": int(len(np.unique(test.users))), "note": HELD_OUT},
        "num_classes": num_classes, "sweep": sorted(sweep, key=lambda p: p["epsilon"]),
        "server_private": str(private_file.relative_to(out)),
        "settings": dict(cfg.__dict__),
    }
    write_json(out / "synth_results.json", results)
    from fedemb.synth.figures import accuracy_plot, log_dir, projector

    accuracy_plot(results, out / "accuracy_vs_epsilon.png")
    projector(test, released.x, released.y, log_dir(out, "gmm"),
              np.random.default_rng(keyed_seed(seed, STREAM_GMM_SAMPLES, 1)))
    return results
