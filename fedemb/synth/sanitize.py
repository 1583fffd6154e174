"""Client-side sanitization: what leaves the device for a customized-synthesis task, and its wire format.

Each object's share is computed from `only(image, region)`, the image with every pixel outside the
object's region set to 0, so the pixels of the other objects cannot influence it. Per object level:
L0 shares nothing (not even the mask), L1 the mask and the Sobel edge magnitude inside it, L2 the mask
and the segment's pixels. An object with an embedding ε also shares its embedding, projected onto the
unit sphere and released with the Gaussian mechanism: replacing the object's content moves a unit (or
zero) vector by at most 2, so the sensitivity is 2 and the noise std 2·z, with z calibrated by Opacus for
one release at (ε, δ). The privacy unit is one object of one reference image; the references are
disjoint, so each reference's release spends the same ε by parallel composition. The embedding's ε
protects only what the level does not already share: an L2 object's pixels leave the device anyway.

The payload holds only the task's name, class names, prototypes, reference labels, the image shape, the
per-object levels, the arrays the levels allow, and each DP embedding's (ε, δ, z, sensitivity).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from fedemb.errors import ConfigError, DataError
from fedemb.privacy.ledger import REPLACE_ONE
from fedemb.privacy.release import LedgerStage
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.task_spec import LEVELS, OBJECTS, CustomTask, object_masks

SENSITIVITY = 2.0
FORMAT = "fedemb-customized-synthesis-payload/1"
METADATA = "metadata.json"
ARRAY_KINDS = ("masks", "edges", "segments", "embeddings")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp keeps the bytes of a payload reproducible

Embed = Callable[[np.ndarray], np.ndarray]  # (k, C, H, W) float32 in [0, 1] -> (k, d)


@dataclass(frozen=True)
class EmbeddingRelease:
    epsilon: float
    delta: float
    noise_multiplier: float  # z: the noise std is z * sensitivity
    sensitivity: float = SENSITIVITY

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity


@dataclass
class Payload:
    """Arrays are stacked over the n references and keyed by object; an object has an entry only where
    its level (or its embedding ε) allows one."""

    task_name: str
    class_names: list[str]
    prototypes: list[int]
    labels: np.ndarray  # (n,) int64 reference labels
    image_shape: tuple[int, int, int]
    levels: dict[str, str]  # per object of the task
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # L1, L2: (n, H, W) bool
    edges: dict[str, np.ndarray] = field(default_factory=dict)  # L1: (n, H, W) float32, 0 outside the mask
    segments: dict[str, np.ndarray] = field(default_factory=dict)  # L2: (n, C, H, W) float32, 0 outside
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # (n, d) float32, noisy
    releases: dict[str, EmbeddingRelease] = field(default_factory=dict)  # per object with embeddings

    def __len__(self) -> int:
        return len(self.labels)

    def level(self, obj: str) -> str:
        return self.levels[obj]

    def mask(self, i: int, obj: str) -> np.ndarray | None:
        return self.masks[obj][i] if obj in self.masks else None

    def edge_map(self, i: int, obj: str) -> np.ndarray | None:
        return self.edges[obj][i] if obj in self.edges else None

    def segment(self, i: int, obj: str) -> np.ndarray | None:
        return self.segments[obj][i] if obj in self.segments else None

    def embedding(self, i: int, obj: str) -> np.ndarray | None:
        return self.embeddings[obj][i] if obj in self.embeddings else None


def only(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(n, C, H, W) images with the pixels outside the (n, H, W) region set to 0."""
    return np.where(region[:, None], images, 0).astype(np.float32)


def edge_maps(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude per channel, averaged over channels, kept inside the region. Each
    (H, W) plane is filtered alone: `ndimage.sobel` on the stacked array would smooth across images."""
    magnitude = np.zeros(images.shape, dtype=np.float64)
    for i, image in enumerate(images):
        for c, plane in enumerate(image.astype(np.float64)):
            magnitude[i, c] = np.hypot(ndimage.sobel(plane, axis=0), ndimage.sobel(plane, axis=1))
    return (magnitude.mean(axis=1) * region).astype(np.float32)


def sanitize(task: CustomTask, embed: Embed | None, stage: LedgerStage | None = None) -> Payload:
    """Everything that may leave the device. Each DP embedding is released into `stage` (the task's
    ledger), its entry written before its noise is drawn; without a stage no embedding is released."""
    wants_embedding = [o for o, p in task.policy.items() if p.embedding_epsilon > 0]
    if wants_embedding and (embed is None or stage is None):
        raise ConfigError(f"{task.path}: embedding_epsilon.{wants_embedding[0]} is set but no "
                          f"{'embedding model' if embed is None else 'ledger'} was given")
    if wants_embedding and stage.ledger.delta != task.delta:
        raise ConfigError(f"{task.path}: the task's delta {task.delta:g} differs from its ledger's {stage.ledger.delta:g}")
    payload = Payload(task_name=task.name, class_names=list(task.class_names), prototypes=list(task.prototypes),
                      labels=task.reference_labels.astype(np.int64), image_shape=task.image_shape,
                      levels={o: p.level for o, p in task.policy.items()})
    for obj, region in object_masks(task.masks, task.objects).items():
        policy = task.policy[obj]
        alone = only(task.references, region)
        if policy.level in ("L1", "L2"):
            payload.masks[obj] = region.astype(bool)
        if policy.level == "L1":
            payload.edges[obj] = edge_maps(alone, region)
        if policy.level == "L2":
            payload.segments[obj] = alone
        if policy.embedding_epsilon > 0:
            release = EmbeddingRelease(policy.embedding_epsilon, task.delta, stage_noise_multiplier(
                policy.embedding_epsilon, task.delta, stage.ledger.accountant))
            noisy = stage.gaussian(f"{obj} embedding", unit_embeddings(alone, embed), release.noise_multiplier,
                                   release.sensitivity, "Gaussian noise on the object's embedding",
                                   {"object": obj, "epsilon": release.epsilon, "references": len(alone),
                                    "composition": "parallel over references"}, neighbouring=REPLACE_ONE)
            payload.embeddings[obj] = noisy.astype(np.float32)
            payload.releases[obj] = release
    return payload


def unit_embeddings(images: np.ndarray, embed: Embed) -> np.ndarray:
    """Each image's embedding on the unit sphere, one image per call, so no reference can influence
    another's embedding (e.g. through batch norm)."""
    rows = []
    for image in images:
        e = np.asarray(embed(image[None]), dtype=np.float64)
        if e.ndim != 2 or e.shape[0] != 1 or not np.isfinite(e).all():
            raise DataError(f"the embedding model must return one finite (1, d) row per image, got shape {e.shape}")
        rows.append(unit_clip(e[0]))
    return np.stack(rows)


def unit_clip(v: np.ndarray) -> np.ndarray:
    """Projection onto the unit sphere; a zero vector stays zero (still within distance 2 of any other)."""
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else np.zeros_like(v)


def privacy_releases(payload: Payload) -> list[dict]:
    """One Gaussian release per object with embeddings; `count` disjoint references compose in parallel."""
    return [{"object": o, "epsilon": r.epsilon, "delta": r.delta, "noise_multiplier": r.noise_multiplier,
             "sensitivity": r.sensitivity, "count": len(payload)} for o, r in payload.releases.items()]


def payload_to_bytes(payload: Payload) -> bytes:
    """A zip of .npy arrays plus metadata.json (np.load reads it too); the same payload gives the same bytes."""
    metadata = {"format": FORMAT, "task_name": payload.task_name, "class_names": payload.class_names,
                "prototypes": payload.prototypes, "image_shape": list(payload.image_shape), "levels": payload.levels,
                "embeddings": {o: {"epsilon": r.epsilon, "delta": r.delta, "noise_multiplier": r.noise_multiplier,
                                   "sensitivity": r.sensitivity, "dim": int(payload.embeddings[o].shape[1])}
                               for o, r in payload.releases.items()}}
    arrays = {"labels": payload.labels.astype(np.int64)}
    for kind in ARRAY_KINDS:
        for obj, array in getattr(payload, kind).items():
            arrays[f"{kind}.{obj}"] = array
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo(METADATA, ZIP_DATE), json.dumps(metadata, sort_keys=True),
                         compress_type=zipfile.ZIP_DEFLATED)
        for name in sorted(arrays):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", ZIP_DATE), npy.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def payload_from_bytes(data: bytes) -> Payload:
    """The server's side: read and check a payload; anything inconsistent is a one-line DataError."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"payload: not a payload archive: {exc}") from None
    if METADATA not in members:
        raise DataError(f"payload: {METADATA} is missing")
    meta = _metadata(members.pop(METADATA))
    arrays = _arrays(members)
    return _PayloadCheck(meta, arrays).build()


def _metadata(raw: bytes) -> dict:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"payload: {METADATA} is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"payload: {METADATA} is not of format {FORMAT}")
    kinds = {"task_name": str, "class_names": list, "prototypes": list, "image_shape": list, "levels": dict,
             "embeddings": dict}
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind):
            raise DataError(f"payload: metadata {key} is missing or not a {kind.__name__}")
    return meta


def _arrays(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, raw in members.items():
        if not name.endswith(".npy"):
            raise DataError(f"payload: unexpected member {name!r}")
        try:
            arrays[name[:-4]] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"payload: array {name} is unreadable: {exc}") from None
    return arrays


class _PayloadCheck:
    """The metadata says which arrays exist and their shapes; the arrays must agree exactly."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta, self.arrays = meta, arrays

    def build(self) -> Payload:
        meta = self.meta
        shape = meta["image_shape"]
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise DataError(f"payload: image_shape must be 3 positive integers, got {shape}")
        channels, height, width = shape
        class_names, prototypes = meta["class_names"], meta["prototypes"]
        if len(prototypes) != len(class_names) or not all(isinstance(p, int) and p >= -1 for p in prototypes):
            raise DataError(f"payload: needs one prototype >= -1 per class, got {prototypes} for {len(class_names)} classes")
        levels = meta["levels"]
        for obj, level in levels.items():
            if obj not in OBJECTS:
                raise DataError(f"payload: unknown object {obj!r} (known: {', '.join(OBJECTS)})")
            if level not in LEVELS:
                raise DataError(f"payload: unknown level {level!r} for {obj} (allowed: {', '.join(LEVELS)})")
        expected = {"labels"}
        expected |= {f"masks.{o}" for o, level in levels.items() if level != "L0"}
        expected |= {f"edges.{o}" for o, level in levels.items() if level == "L1"}
        expected |= {f"segments.{o}" for o, level in levels.items() if level == "L2"}
        expected |= {f"embeddings.{o}" for o in meta["embeddings"]}
        missing, extra = sorted(expected - set(self.arrays)), sorted(set(self.arrays) - expected)
        if missing:
            raise DataError(f"payload: missing array {missing[0]} (the metadata's levels and embeddings need it)")
        if extra:
            raise DataError(f"payload: unexpected array {extra[0]} (the metadata's levels do not allow it)")
        labels = self.array("labels", None, np.integer)
        n = len(labels)
        if labels.ndim != 1 or (n and (labels.min() < 0 or labels.max() >= len(class_names))):
            raise DataError(f"payload: labels must be (n,) indices into the {len(class_names)} classes")
        payload = Payload(task_name=meta["task_name"], class_names=list(class_names), prototypes=list(prototypes),
                          labels=labels.astype(np.int64), image_shape=(channels, height, width), levels=dict(levels))
        for obj, level in levels.items():
            if level == "L0":
                continue
            mask = payload.masks[obj] = self.array(f"masks.{obj}", (n, height, width), np.bool_)
            if level == "L1":
                edges = payload.edges[obj] = self.array(f"edges.{obj}", (n, height, width), np.floating)
                if (edges[~mask] != 0).any() or (edges < 0).any():
                    raise DataError(f"payload: edges.{obj} must be >= 0 inside its mask and 0 outside")
            else:
                segment = payload.segments[obj] = self.array(f"segments.{obj}", (n, channels, height, width),
                                                             np.floating)
                outside = np.moveaxis(segment, 1, -1)[~mask]
                if (outside != 0).any() or segment.min(initial=0) < 0 or segment.max(initial=0) > 1:
                    raise DataError(f"payload: segments.{obj} must lie in [0, 1] inside its mask and be 0 outside")
        for obj, info in meta["embeddings"].items():
            if obj not in levels:
                raise DataError(f"payload: an embedding for {obj!r}, which is not an object of the task")
            release = self.release(obj, info)
            payload.embeddings[obj] = self.array(f"embeddings.{obj}", (n, info["dim"]), np.floating)
            payload.releases[obj] = release
        return payload

    def array(self, name: str, shape: tuple[int, ...] | None, kind: type) -> np.ndarray:
        array = self.arrays[name]
        if shape is not None and array.shape != shape:
            raise DataError(f"payload: {name} has shape {array.shape}, the metadata says {shape}")
        if not np.issubdtype(array.dtype, kind):
            raise DataError(f"payload: {name} has dtype {array.dtype}, expected {kind.__name__}")
        if kind is np.floating and not np.isfinite(array).all():
            raise DataError(f"payload: {name} has non-finite values")
        return array

    def release(self, obj: str, info: dict) -> EmbeddingRelease:
        keys = ("epsilon", "delta", "noise_multiplier", "sensitivity", "dim")
        if not isinstance(info, dict) or any(not isinstance(info.get(k), (int, float)) for k in keys):
            raise DataError(f"payload: embeddings.{obj} metadata needs numbers {', '.join(keys)}")
        ok = (0 < info["epsilon"] < math.inf and 0 < info["delta"] < 1 and info["noise_multiplier"] >= 0
              and info["sensitivity"] > 0 and isinstance(info["dim"], int) and info["dim"] > 0)
        if not ok:
            raise DataError(f"payload: embeddings.{obj} metadata is out of range: {info}")
        return EmbeddingRelease(float(info["epsilon"]), float(info["delta"]), float(info["noise_multiplier"]),
                                float(info["sensitivity"]))
