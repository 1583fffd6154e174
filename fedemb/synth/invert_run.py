"""`fedemb synth invert`: images from the private model, and how well models trained on them do.

One stage of the privacy ledger holds the DP activation statistics (count, sums, squares) and the DP
class prototypes of the class term; the stage's ε is split over them (fedemb.synth.budget). With
`invert.statistics = "batchnorm"` the statistics are BatchNorm buffers that were inside the clipped
DP update, so only the prototypes are released. Everything after the releases is post-processing:
inversion, the classifiers trained on its images, the ablation without statistics.

Evaluation (every figure on the config's held-out users' real images):
- from scratch, hard labels: a fresh model of the same architecture trained on the inverted images;
- distillation: the same, with soft labels from the private model (prototype softmax) as the teacher;
- ablation: both again on images optimised with no statistics term (class term and priors only);
- references: chance and the private model's own classifier over the DP prototypes.

The held-out users are a separate population, never trained on: accuracy on them is post-processing of
the releases. A fresh model trained on as many real private images (non-private, for scale only) is
server-private: it goes to OUT/private/, never to invert_results.json or the console.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedemb.errors import ConfigError
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.privacy.streams import STREAM_INVERT, STREAM_INVERT_REAL, STREAM_INVERT_TRAIN
from fedemb.run_dir import write_json, write_private_json
from fedemb.synth.activation_stats import (INPUT, ActivationStatistics, batchnorm_statistics, layer_names,
                                           release_activation_statistics)
from fedemb.synth.adaptive_gmm import fit_mixture
from fedemb.synth.baselines import dp_prototypes, prototype_accuracy
from fedemb.synth.budget import split_noise_multiplier, stage_noise_multiplier
from fedemb.synth.gmm import ReleasedGMM, check_fit_inputs
from fedemb.synth.image_classifier import classifier_accuracy, fresh_classifier, prototype_teacher, train_classifier
from fedemb.synth.inversion import InversionSettings, invert
from fedemb.synth.pipeline import HELD_OUT

PRIVATE_FILE = "invert_private.json"
PIXEL_START_NEEDS_PIXELS = ("invert.init = 'pixels' needs the pixel statistics: add 'input' to invert.layers "
                            "(or set invert.init = 'noise')")


@dataclass
class PrivateModel:
    """The released encoder and what synthesis reads from the config's data."""

    net: torch.nn.Module
    image_shape: tuple[int, int, int]
    private: object  # Population of the private training users
    test_images: np.ndarray  # (n, C, H, W) in [0, 1], the held-out users
    test_labels: np.ndarray
    embedded: object  # fedemb.synth.from_run.SynthesisData


def load_private_model(cfg, checkpoint: Path) -> PrivateModel:
    from fedemb.synth.from_run import embed_for_synthesis, load_encoder

    net, splits = load_encoder(cfg, checkpoint)
    embedded = embed_for_synthesis(cfg, checkpoint, loaded=(net, splits))
    test = splits.eval
    test_images = np.asarray(test.images, dtype=np.float32) * test.pixel_scale
    return PrivateModel(net, splits.train.image_shape, splits.train, test_images, np.asarray(test.labels),
                        embedded)


def inversion_settings(iv, **overrides) -> InversionSettings:
    fields = ("steps", "lr", "weight_statistics", "weight_class", "weight_tv", "weight_l2", "temperature",
              "jitter", "flip", "weight_embedding")
    return InversionSettings(**{**{f: getattr(iv, f) for f in fields}, **overrides})


@dataclass
class Released:
    """What the stage released: the activation statistics, the class anchors (unit rows), and with
    `anchors = "mixture"` the DP mixture the images' target embeddings are sampled from."""

    stats: ActivationStatistics
    anchors: np.ndarray
    mixture: ReleasedGMM | None = None


def release_statistics(model: PrivateModel, cfg, stage: LedgerStage, rng: np.random.Generator) -> Released:
    """The stage's releases, each recorded in the ledger before its noise: activation statistics and
    class anchors (DP prototypes, or a DP mixture). `rng` draws only the mixture's data-independent
    starting points."""
    iv, ledger = cfg.invert, stage.ledger
    z = stage_noise_multiplier(iv.epsilon, ledger.delta, ledger.accountant)
    if iv.statistics == "dp":
        statistics_share = iv.budget_count + iv.budget_means + iv.budget_squares
        z_stage = split_noise_multiplier(z, {"statistics": statistics_share, "anchors": iv.budget_prototypes})
        stats = release_activation_statistics(
            model.net, iv.layers, model.private, iv.activation_clip, iv.contribution_bound, z_stage["statistics"],
            {"count": iv.budget_count, "means": iv.budget_means, "squares": iv.budget_squares}, stage)
        z_anchors = z_stage["anchors"]
    else:
        stats = batchnorm_statistics(model.net)
        z_anchors = z
    data = model.embedded
    if iv.anchors == "mixture":
        mixture = fit_mixture(data.private, data.num_classes, cfg.synth, z_anchors, stage, rng, data.public)
        return Released(stats, mixture.class_means(), mixture)
    return Released(stats, dp_prototypes(data.private, data.num_classes, z_anchors, iv.contribution_bound, stage))


def check_settings(cfg, model: PrivateModel) -> None:
    """What would fail after a release, refused before any."""
    iv, data = cfg.invert, model.embedded
    if iv.anchors == "mixture":
        check_fit_inputs(data.private, data.num_classes, cfg.synth, data.public)
    if iv.init == "pixels" and (iv.statistics != "dp" or INPUT not in layer_names(iv.layers)):
        raise ConfigError(PIXEL_START_NEEDS_PIXELS)


def pixel_start(stats: ActivationStatistics, n: int, image_shape: tuple[int, int, int],
                rng: np.random.Generator) -> np.ndarray:
    """(n, C, H, W) in [0, 1]: uniform noise whose mean is the released mean pixel of each channel."""
    if INPUT not in stats.layers:
        raise ConfigError(PIXEL_START_NEEDS_PIXELS)
    mean = (np.asarray(stats.means[stats.layers.index(INPUT)], dtype=np.float64) + 1) / 2  # model scale -> [0, 1]
    if len(mean) != image_shape[0]:
        raise ConfigError(f"the pixel statistics have {len(mean)} channels, the model takes {image_shape[0]}")
    high = np.clip(2 * mean, 0.02, 1.0)[None, :, None, None]
    low = np.clip(2 * mean - 1, 0.0, 0.98)[None, :, None, None]
    return (low + (high - low) * rng.random((n, *image_shape))).astype(np.float32)


def fresh_accuracy(cfg, model: PrivateModel, images: np.ndarray, labels: np.ndarray | None, seed: int,
                   teacher=None) -> float:
    iv = cfg.invert
    student = fresh_classifier(cfg.model, model.image_shape, model.embedded.num_classes, seed)
    train_classifier(student, images, iv.train_epochs, iv.train_lr, seed, labels=labels, teacher=teacher,
                     affine_strength=iv.train_affine)
    return classifier_accuracy(student, model.test_images, model.test_labels)


def run_inversion(cfg, model: PrivateModel, ledger: PrivacyLedger, out: Path, progress=None,
                  noise: NoiseSource | None = None) -> dict:
    """Writes the outputs under `out` and returns invert_results.json's content. `progress(phase,
    step, loss)` follows the optimisation. The noise comes from `noise`, by default from invert.seed
    (OS randomness when it is -1), which also seeds the post-processing."""
    iv = cfg.invert
    out.mkdir(parents=True, exist_ok=True)
    seed = iv.seed if iv.seed >= 0 else secrets.randbits(63)  # post-processing: inversion, training
    noise = noise or NoiseSource(iv.seed if iv.seed >= 0 else None)
    epsilon_before = ledger.epsilon
    check_settings(cfg, model)  # before anything is released
    stage = LedgerStage.new(ledger, "synthesis/invert", noise)
    released = release_statistics(model, cfg, stage, np.random.default_rng(keyed_seed(seed, STREAM_INVERT, 1)))
    stats, protos = released.stats, released.anchors
    stats.save(out / "statistics.npz")
    np.save(out / "prototypes.npy", protos)
    if released.mixture is not None:
        released.mixture.save(out / "mixture.npz")
    num_classes = model.embedded.num_classes
    centre = model.embedded.centre

    def inverted(phase: str, **overrides) -> tuple[np.ndarray, np.ndarray, dict, float]:
        started = time.perf_counter()
        images, labels, summary = invert_in_batches(
            model, iv, released, num_classes, keyed_seed(seed, STREAM_INVERT) % 2**63, centre, overrides,
            progress=(lambda step, loss: progress(phase, step, loss)) if progress else None)
        return images, labels, summary, time.perf_counter() - started

    sets = {"inverted": inverted("inverted")}
    if iv.ablation:
        sets["no_statistics"] = inverted("no statistics", weight_statistics=0.0)
    teacher = prototype_teacher(model.net, protos, centre, iv.distill_temperature)
    train_seed = keyed_seed(seed, STREAM_INVERT_TRAIN) % 2**31
    evaluation = {}
    for name, (images, labels, summary, seconds) in sets.items():
        np.savez(out / f"{name}.npz", images=images, labels=labels)
        if progress:
            progress(f"training on {name}", 0, float("nan"))
        evaluation[name] = {
            "from_scratch_accuracy": fresh_accuracy(cfg, model, images, labels, train_seed),
            "distilled_accuracy": fresh_accuracy(cfg, model, images, None, train_seed, teacher),
            "stage": stage.name, "inversion_seconds": seconds, "optimisation": summary}
    results = {
        "released": {"stage": stage.name, "epsilon": stage.epsilon, "target_epsilon": iv.epsilon,
                     "releases": len(stage.entries), "statistics": stats.source, "layers": stats.layers,
                     "noise_predictable_from_seed": noise.predictable},
        "delta": ledger.delta, "accountant": ledger.accountant, "unit": ledger.unit,
        "ledger_epsilon_before": epsilon_before, "ledger_epsilon_total": ledger.epsilon,
        "num_classes": num_classes, "synthetic_images": int(len(sets["inverted"][1])),
        "test": {"examples": int(len(model.test_labels)), "note": HELD_OUT},
        "evaluation": evaluation,
        "references": {
            "chance": 1.0 / num_classes, "stage": stage.name,
            "private_model_prototype_accuracy": prototype_accuracy(protos, model.embedded.test.x,
                                                                   model.embedded.test.labels)},
        "server_private": str(write_nonprivate_reference(cfg, model, out, len(sets["inverted"][1]), seed, train_seed)
                              .relative_to(out)),
        "settings": dict(iv.__dict__),
    }
    write_json(out / "invert_results.json", results)
    from fedemb.synth.figures import save_image_grids

    save_image_grids({name: (images, labels) for name, (images, labels, _, _) in sets.items()}, out, "invert",
                     {"ε of this release": results["released"]["epsilon"], "δ": results["delta"], "unit": results["unit"],
                      "ledger ε in all": results["ledger_epsilon_total"]})
    return results


def inversion_batches(iv) -> tuple[int, int]:
    """Images per class in one optimisation batch, and how many batches make `iv.images_per_class`."""
    per_batch = min(iv.batch_per_class, iv.images_per_class)
    return per_batch, -(-iv.images_per_class // per_batch)


def invert_in_batches(model: PrivateModel, iv, released: Released, num_classes: int, seed: int,
                      centre: np.ndarray | None, overrides: dict | None = None, progress=None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """`iv.images_per_class` images of every class, optimised in batches of `iv.batch_per_class` per
    class (every batch holds all classes, like the data the statistics describe). Returns the images,
    their labels and the last batch's optimisation summary with the batch count."""
    per_batch, batches = inversion_batches(iv)
    settings = inversion_settings(iv, **(overrides or {}))
    from_pixels = iv.init == "pixels" or (iv.init == "auto" and INPUT in released.stats.layers)
    images, labels, summary = [], [], {}
    for b in range(batches):
        count = min(per_batch, iv.images_per_class - b * per_batch)
        batch_labels = np.repeat(np.arange(num_classes), count)
        rng = np.random.default_rng(keyed_seed(seed, STREAM_INVERT, 2, b))
        init = pixel_start(released.stats, len(batch_labels), model.image_shape, rng) if from_pixels else None
        targets = None
        if released.mixture is not None and iv.weight_embedding > 0:
            targets = released.mixture.sample_for(batch_labels, rng)
        batch, summary = invert(model.net, batch_labels, model.image_shape, settings,
                                keyed_seed(seed, STREAM_INVERT, 3, b) % 2**63, released.stats, released.anchors, centre,
                                init=init, targets=targets,
                                progress=(lambda step, loss, b=b: progress(b * settings.steps + step, loss))
                                if progress else None)
        images.append(batch)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels), summary | {"batches": batches}


def write_nonprivate_reference(cfg, model: PrivateModel, out: Path, count: int, seed: int, train_seed: int) -> Path:
    """Not DP, for scale: a fresh model trained on `count` real private images, in OUT/private/."""
    real_rows = np.random.default_rng(keyed_seed(seed, STREAM_INVERT_REAL)).choice(
        len(model.private), size=min(count, len(model.private)), replace=False)
    real_rows.sort()
    real_images = np.asarray(model.private.images[real_rows], dtype=np.float32) * model.private.pixel_scale
    accuracy = fresh_accuracy(cfg, model, real_images, np.asarray(model.private.labels[real_rows]), train_seed)
    return write_private_json(out, PRIVATE_FILE, {
        "what": "not DP: a fresh model trained on real private images; never publish",
        "real_images_same_count_nonprivate": accuracy, "real_images": int(len(real_rows))})
