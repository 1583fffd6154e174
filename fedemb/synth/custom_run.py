"""`fedemb synth custom`: one user's customized synthesis, end to end, with the three roles kept apart.

- device: loads the task, sanitizes it (fedemb.synth.sanitize) and writes the payload's bytes, the
  only thing that is uploaded; DP embeddings go to the task's own ledger (unit: one reference image,
  whose objects compose, while references compose in parallel);
- server: reads those bytes back and synthesizes (fedemb.synth.custom) from them alone, with the
  federated model's released artifacts (a `synth invert` directory's DP statistics and prototypes) as
  post-processing, so the run's ledger does not change;
- device again: trains a fresh model on the synthetic images, tests it on the user's real held-out
  images, next to the L0-only baseline (nothing uploaded), and measures per object what was shared.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np
import torch

from fedemb.errors import DataError
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.run_dir import write_json
from fedemb.synth.activation_stats import ActivationStatistics, named_layers
from fedemb.synth.custom import CustomSettings, custom_settings, synthesize
from fedemb.synth.image_classifier import classifier_accuracy, train_classifier
from fedemb.synth.object_privacy import object_privacy_report
from fedemb.synth.sanitize import Payload, only, payload_from_bytes, payload_to_bytes, privacy_releases, sanitize
from fedemb.synth.task_spec import CustomTask, object_masks

PAYLOAD_FILE = "payload.bin"
EMBEDDING_STAGE = "customized synthesis/embeddings"


def device_encoder(net: torch.nn.Module, centre: np.ndarray | None):
    """(k, C, H, W) images in [0, 1] -> (k, d) embeddings, centred as the synthesis space is."""
    @torch.no_grad()
    def embed(images01: np.ndarray) -> np.ndarray:
        net.eval()
        e = net(torch.as_tensor(images01, dtype=torch.float32) * 2 - 1).numpy()
        return e - centre if centre is not None else e
    return embed


def released_artifacts(directory: Path | None, net: torch.nn.Module, dim: int
                       ) -> tuple[ActivationStatistics | None, np.ndarray | None]:
    """A `synth invert` output: its DP activation statistics and DP class prototypes."""
    if directory is None:
        return None, None
    stats_file, protos_file = Path(directory) / "statistics.npz", Path(directory) / "prototypes.npy"
    for file in (stats_file, protos_file):
        if not file.is_file():
            raise DataError(f"--statistics {directory}: {file.name} not found (give a `fedemb synth invert` output)")
    stats = ActivationStatistics.load(stats_file)
    layers = named_layers(net)
    missing = [n for n in stats.layers if n not in layers]
    protos = np.load(protos_file)
    if missing or protos.ndim != 2 or protos.shape[1] != dim:
        raise DataError(f"--statistics {directory}: released for another model (layer {missing[:1]}, "
                        f"prototypes {protos.shape} vs embedding dim {dim})")
    return stats, protos


def nothing_shared(payload: Payload) -> Payload:
    """The payload of the same task with every object at L0 and no embeddings."""
    return Payload(payload.task_name, payload.class_names, payload.prototypes, payload.labels, payload.image_shape,
                   {o: "L0" for o in payload.levels})


def task_accuracy(model_cfg, net: torch.nn.Module, centre: np.ndarray | None, task: CustomTask, images: np.ndarray,
                  labels: np.ndarray, settings: CustomSettings, seed: int) -> float:
    """The specialised model trained on the synthetic images, on the user's real held-out images."""
    from fedemb.synth.image_classifier import EncoderHead, fresh_classifier

    if len(task.test_labels) == 0:
        return float("nan")
    if settings.model == "head":
        student = EncoderHead(net, centre, model_cfg.embedding_dim, len(task.class_names), seed)
    else:
        student = fresh_classifier(model_cfg, task.image_shape, len(task.class_names), seed)
    train_classifier(student, images, settings.train_epochs, settings.train_lr, seed, labels=labels)
    return classifier_accuracy(student, task.test_images, task.test_labels)


def embedding_similarity(embed, task: CustomTask, images: np.ndarray, reference: np.ndarray) -> dict[str, dict]:
    """Per object: mean cosine between each synthetic image's object region and the raw object of its
    reference, and for scale the mean cosine between raw objects of different references of one class."""
    def unit(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    out = {}
    for obj, region in object_masks(task.masks, task.objects).items():
        raw = unit(embed(only(task.references, region)))
        synthetic = unit(embed(only(images, region[reference])))
        own = float((synthetic * raw[reference]).sum(1).mean())
        same_class = [float(raw[i] @ raw[j]) for i in range(len(raw)) for j in range(i + 1, len(raw))
                      if task.reference_labels[i] == task.reference_labels[j]]
        out[obj] = {"synthetic_vs_own_reference": own,
                    "raw_references_same_class": float(np.mean(same_class)) if same_class else None}
    return out


def run_custom(model_cfg, net: torch.nn.Module, centre: np.ndarray | None, task: CustomTask, out: Path,
               accountant: str, statistics_dir: Path | None = None, baseline: bool = True, progress=None) -> dict:
    settings = custom_settings(task.synthesis, str(task.path))
    stats, population_prototypes = released_artifacts(statistics_dir, net, model_cfg.embedding_dim)
    out.mkdir(parents=True, exist_ok=True)
    seed = task.seed if task.seed >= 0 else secrets.randbits(63)
    embed = device_encoder(net, centre)

    # device
    ledger = PrivacyLedger(out / "privacy.json", task.delta, accountant, unit="reference image")
    noise = NoiseSource(task.seed if task.seed >= 0 else None)
    payload = sanitize(task, embed, LedgerStage(ledger, EMBEDDING_STAGE, noise))
    uploaded = payload_to_bytes(payload)
    (out / PAYLOAD_FILE).write_bytes(uploaded)

    # server: the bytes and the released artifacts, nothing else
    received = payload_from_bytes(uploaded)
    started = time.perf_counter()
    images, targets, summary = synthesize(net, received, settings, seed % 2**63, centre, population_prototypes,
                                          stats, progress=(lambda s, l: progress("synthesis", s, l)) if progress else None)
    summary["seconds"] = time.perf_counter() - started
    np.savez(out / "synthetic.npz", images=images, labels=targets.labels, reference=targets.reference)

    # device: evaluation and privacy measures
    if progress:
        progress("training on the synthetic images", 0, float("nan"))
    results = {
        "task": task.name, "classes": task.class_names, "references": int(len(task.references)),
        "test_images": int(len(task.test_labels)), "chance": 1.0 / len(task.class_names),
        "levels": {o: p.level for o, p in task.policy.items()},
        "uploaded_bytes": len(uploaded),
        "customized": {"accuracy": task_accuracy(model_cfg, net, centre, task, images, targets.labels, settings,
                                                   seed % 2**31),
                       "synthetic_images": int(len(images)), "optimisation": summary},
        "privacy": {"objects": object_privacy_report(task, payload),
                    "embedding_similarity": embedding_similarity(embed, task, images, targets.reference),
                    "releases": privacy_releases(payload), "epsilon_per_reference_image": ledger.epsilon,
                    "delta": task.delta, "unit": ledger.unit,
                    "federated_run_ledger": "unchanged: synthesis uses released artifacts only"},
        "settings": settings.model_dump(),
        "statistics_from": str(statistics_dir) if statistics_dir else None,
    }
    grids = {"synthetic": (images, targets.labels)}
    if baseline:
        if progress:
            progress("L0-only baseline", 0, float("nan"))
        base_images, base_targets, base_summary = synthesize(
            net, nothing_shared(received), settings.model_copy(), seed % 2**63, centre, population_prototypes, stats)
        results["l0_baseline"] = {"accuracy": task_accuracy(model_cfg, net, centre, task, base_images,
                                                            base_targets.labels, settings, seed % 2**31),
                                  "optimisation": base_summary}
        grids["l0_baseline"] = (base_images, base_targets.labels)
        np.savez(out / "l0_baseline.npz", images=base_images, labels=base_targets.labels)
    write_json(out / "custom_results.json", results)
    from fedemb.synth.figures import save_image_grids

    grids |= shared_views(received)
    save_image_grids(grids, out, "custom", {"ε per reference image": ledger.epsilon, "δ": task.delta, "unit": ledger.unit})
    return results


def shared_views(payload: Payload) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What left the device, as pictures: each L1 object's edge map and each L2 object's segment."""
    views = {}
    for obj, edges in payload.edges.items():
        scaled = edges / max(float(edges.max()), 1e-12)
        views[f"shared_edges_{obj}"] = (scaled[:, None].astype(np.float32), payload.labels)
    for obj, segment in payload.segments.items():
        views[f"shared_segments_{obj}"] = (segment.astype(np.float32), payload.labels)
    return views
