"""`fedemb synth dataset`: one command from a private run to a labelled synthetic image dataset.

The stage releases what `fedemb synth invert` releases (DP activation statistics and class anchors, each
recorded in the run's ledger before its noise is drawn) and inverts them into images; everything after
the releases is post-processing. The dataset is written for direct use:

- `images/CLASS/NNNNN.png`: `torchvision.datasets.ImageFolder(OUT / "images")` loads it as it is;
- `synthetic.npz`: `images` uint8 (n, H, W, C), `labels` int64 (n,), and `soft_labels` float32 (n,
  classes), the private model's class probabilities (post-processing of the released model and anchors),
  for distillation;
- `datasheet.md` / `datasheet.json`: provenance (run, checkpoint digest, method and settings), the
  stage's ε and the ledger's end-to-end ε with δ and the privacy unit, and, with `evaluate`, the accuracy
  of a fresh classifier trained on the dataset alone, on the held-out users' real images.

The stage's ε is given (`epsilon`), or chosen as the largest that keeps the ledger's end-to-end ε within
`total_epsilon`: a function of the ledger and the settings alone, so choosing it releases nothing.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fedemb.errors import ConfigError
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource, gaussian_entry
from fedemb.privacy.streams import STREAM_INVERT, STREAM_INVERT_TRAIN
from fedemb.run_dir import write_json
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.image_classifier import prototype_teacher
from fedemb.synth.invert_run import PrivateModel, check_settings, fresh_accuracy, invert_in_batches, release_statistics
from fedemb.synth.pipeline import HELD_OUT

STAGE = "synthesis/dataset"


def stage_epsilon_within(ledger: PrivacyLedger, total_epsilon: float) -> float:
    """The largest stage ε whose release keeps the ledger's ε within `total_epsilon` (a stage of Gaussian
    releases composes like one Gaussian release of the stage's noise multiplier)."""
    if not ledger.epsilon < total_epsilon:
        raise ConfigError(f"the ledger already holds ε = {ledger.epsilon:.4g}, not below --total-epsilon "
                          f"{total_epsilon:g}: no budget is left for a synthesis stage")

    def total_with(stage_eps: float) -> float:
        z = stage_noise_multiplier(stage_eps, ledger.delta, ledger.accountant)
        return ledger.epsilon_with(gaussian_entry("planned", "planned stage", z, 1.0, "planned", ledger.unit))

    low, high = 1e-3, total_epsilon
    if total_with(low) > total_epsilon:
        raise ConfigError(f"--total-epsilon {total_epsilon:g} leaves too little for a synthesis stage "
                          f"(the ledger holds ε = {ledger.epsilon:.4g})")
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if total_with(mid) <= total_epsilon else (low, mid)
    return low


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """images (n, C, H, W) in [0, 1] as PNGs under root/CLASS/, CLASS the zero-padded class index."""
    from PIL import Image

    width = len(str(int(labels.max()))) if len(labels) else 1
    counters: dict[int, int] = {}
    pixels = np.round(images * 255).astype(np.uint8)
    for image, label in zip(pixels, labels):
        folder = root / f"{int(label):0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        index = counters.get(int(label), 0)
        counters[int(label)] = index + 1
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / f"{index:05d}.png")


@torch.no_grad()
def soft_labels(teacher, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    out = [teacher(torch.as_tensor(images[i:i + batch_size]) * 2 - 1).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def write_synthetic_dataset(cfg, model: PrivateModel, ledger: PrivacyLedger, out: Path, run: Path | None,
                            checkpoint: Path, evaluate: bool = True, progress=None,
                            requested: dict | None = None) -> dict:
    """Release into a new `synthesis/dataset N` stage of `ledger` at `cfg.invert.epsilon`, invert, write
    the dataset and its datasheet under `out`; returns datasheet.json's content."""
    iv = cfg.invert
    check_settings(cfg, model)  # before anything is released
    if (out / "images").exists() or (out / "synthetic.npz").exists():
        raise ConfigError(f"{out} already holds a dataset: a dataset goes into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    seed = iv.seed if iv.seed >= 0 else secrets.randbits(63)
    noise = NoiseSource(iv.seed if iv.seed >= 0 else None)
    epsilon_before = ledger.epsilon
    stage = LedgerStage.new(ledger, STAGE, noise)
    released = release_statistics(model, cfg, stage, np.random.default_rng(keyed_seed(seed, STREAM_INVERT, 1)))
    num_classes = model.embedded.num_classes
    started = time.perf_counter()
    images, labels, summary = invert_in_batches(
        model, iv, released, num_classes, keyed_seed(seed, STREAM_INVERT) % 2**63, model.embedded.centre,
        progress=(lambda step, loss: progress("inverting", step, loss)) if progress else None)
    seconds = time.perf_counter() - started
    teacher = prototype_teacher(model.net, released.anchors, model.embedded.centre, iv.distill_temperature)
    soft = soft_labels(teacher, images)
    write_image_folder(images, labels, out / "images")
    pixels = np.round(images * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(out / "synthetic.npz", images=pixels, labels=labels.astype(np.int64), soft_labels=soft)
    evaluation = None
    if evaluate:
        if progress:
            progress("training a classifier on the dataset", 0, float("nan"))
        train_seed = keyed_seed(seed, STREAM_INVERT_TRAIN) % 2**31
        evaluation = {
            "distilled_accuracy": fresh_accuracy(cfg, model, images, None, train_seed, teacher),
            "hard_label_accuracy": fresh_accuracy(cfg, model, images, labels, train_seed),
            "test_examples": int(len(model.test_labels)), "note": HELD_OUT,
            "classifier": f"{cfg.model.name} from random initialisation, {iv.train_epochs} epochs on the "
                          "synthetic images only (distilled: soft labels of the private model)"}
    sheet = {
        "what": "a differentially private synthetic image dataset made by fedemb from a DP-FedEmb run",
        "files": {"image_folder": "images/", "numpy": "synthetic.npz (images uint8 (n, H, W, C), labels, "
                  "soft_labels)"},
        "composition": {"images": int(len(labels)), "classes": num_classes,
                        "per_class": np.bincount(labels, minlength=num_classes).tolist(),
                        "image_shape": list(model.image_shape)},
        "provenance": {"run": str(run) if run is not None else None, "checkpoint": str(checkpoint),
                       "checkpoint_sha256": file_digest(checkpoint), "model": cfg.model.name,
                       "method": "embedding-guided inversion" if released.mixture is not None
                       else "statistics inversion",
                       "releases": [e.release for e in stage.entries], "statistics": released.stats.source,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "settings": dict(iv.__dict__), "inversion_seconds": seconds,
                       "optimisation": summary},
        "privacy": {"requested": requested or {"epsilon": iv.epsilon}, "stage": stage.name,
                    "stage_epsilon": stage.epsilon, "ledger_epsilon_before": epsilon_before,
                    "end_to_end_epsilon": ledger.epsilon, "delta": ledger.delta, "unit": ledger.unit,
                    "accountant": ledger.accountant, "noise_predictable_from_seed": noise.predictable,
                    "ledger": str(ledger.path) if ledger.path is not None else None},
        "evaluation": evaluation,
    }
    write_json(out / "datasheet.json", sheet)
    (out / "datasheet.md").write_text(datasheet_markdown(sheet))
    from fedemb.synth.figures import save_image_grids

    save_image_grids({"dataset": (images, labels)}, out, "dataset",
                     {"stage ε": stage.epsilon, "end-to-end ε": ledger.epsilon, "δ": ledger.delta, "unit": ledger.unit})
    return sheet


def datasheet_markdown(sheet: dict) -> str:
    p, c, v = sheet["privacy"], sheet["composition"], sheet["provenance"]
    lines = [
        "# Datasheet: DP synthetic image dataset", "",
        f"{c['images']} images of shape {tuple(c['image_shape'])} (channels, height, width), {c['classes']} "
        f"classes ({', '.join(str(n) for n in c['per_class'])} per class).", "",
        "## Privacy", "",
        f"- End-to-end: **(ε, δ) = ({p['end_to_end_epsilon']:.3g}, {p['delta']:.3g})** per {p['unit']} "
        f"({p['accountant']} accountant): the run's ledger after this dataset's releases "
        f"(it held ε = {p['ledger_epsilon_before']:.3g} before).",
        f"- This dataset's own stage `{p['stage']}`: ε = {p['stage_epsilon']:.3g}.",
        "- Noise predictable from a published seed: " + ("**yes (not DP against whoever knows the seed)**"
                                                          if p["noise_predictable_from_seed"] else "no (OS randomness)"),
        "- Everything in this folder is post-processing of the run's DP releases.", "",
        "## Provenance", "",
        f"- Run: `{v['run']}`; checkpoint `{v['checkpoint']}` (sha256 {v['checkpoint_sha256'][:16]}…), model "
        f"`{v['model']}`.",
        f"- Method: {v['method']} ({', '.join(v['releases'])}); made {v['created']}.", "",
        "## Loading", "",
        "```python",
        "from torchvision.datasets import ImageFolder",
        "data = ImageFolder(\"images\")           # or: numpy.load(\"synthetic.npz\")",
        "```", "",
    ]
    e = sheet["evaluation"]
    if e:
        lines += ["## Evaluation", "",
                  f"A fresh classifier trained on these images alone, tested on {e['test_examples']} real images "
                  f"of held-out users: distilled {e['distilled_accuracy']:.3f}, hard labels "
                  f"{e['hard_label_accuracy']:.3f}. {e['note'][0].upper() + e['note'][1:]}.", ""]
    lines += ["## Intended use and limits", "",
              "Training and evaluating models without access to the private data. The images are optimised to "
              "match the private model's view of the data, not the data itself; they can carry the private "
              "model's biases.", ""]
    return "\n".join(lines)
