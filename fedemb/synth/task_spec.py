"""A customized-synthesis task: the user's reference images per class, how much of each object may
leave the device, and their held-out test images.

The task is a TOML file; every path in it is relative to the file's folder. An image splits into two
objects by a boolean mask: `foreground` (mask True) and `background` (mask False). Under
mask_rule = "none" there is no mask, and the whole image is the single object `foreground`: the task's
`policy` then has that one key, and `object_masks(masks, task.objects)` gives only that region.

    name = "writer-2301"
    delta = 1e-5                   # optional, in (0, 1); for the DP embeddings
    mask_rule = "threshold:0.3"    # "file" | "threshold:T" (T in (0, 1)) | "none" (the default)
    seed = 0                       # optional, -1 (the default) = OS randomness

    [levels]                       # required, both objects: "L0" | "L1" | "L2"
    foreground = "L2"
    background = "L0"

    [embedding_epsilon]            # optional, per object: share a DP embedding at this ε (0 = none)
    foreground = 4.0

    [[classes]]
    name = "three"
    prototype = 3                  # optional class index of the federated model, -1 (the default) = none
    references = ["refs/three_0.png"]           # PNG/JPEG (PIL) or .npy (H, W) / (C, H, W)
    masks = ["refs/three_0_mask.png"]           # iff mask_rule = "file"; nonzero = foreground

    # or, instead of per-class lists, one archive (then classes have only name and prototype):
    # references = "refs.npz"      # images (n, [C,] H, W), labels (n,), masks (n, H, W) iff mask_rule = "file"

    [test]                         # optional; stays on the device
    images = "test.npz"            # images (n, [C,] H, W), labels (n,)

    [synthesis]                    # optional server knobs: str -> scalar, validated by the server
    images_per_reference = 16

Pixels: uint8 is scaled by 1/255, uint16 by 1/65535, floats must already lie in [0, 1].
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedemb.config import read_toml
from fedemb.errors import ConfigError, DataError

OBJECTS = ("foreground", "background")
LEVELS = ("L0", "L1", "L2")
MASK_RULES = ("file", "threshold:T", "none")

TOP_KEYS = ("name", "delta", "mask_rule", "seed", "levels", "embedding_epsilon", "classes", "references",
            "test", "synthesis")
CLASS_KEYS = ("name", "prototype", "references", "masks")
ARCHIVE_CLASS_KEYS = ("name", "prototype")
TEST_KEYS = ("images",)

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@dataclass
class ObjectPolicy:
    level: str
    embedding_epsilon: float = 0.0  # 0: no DP embedding of this object is shared


@dataclass
class CustomTask:
    name: str
    path: Path
    class_names: list[str]
    prototypes: list[int]
    references: np.ndarray  # (n, C, H, W) float32 in [0, 1]
    reference_labels: np.ndarray  # (n,) int64
    masks: np.ndarray  # (n, H, W) bool, True = foreground (all True under mask_rule "none")
    policy: dict[str, ObjectPolicy]  # per object present: both OBJECTS, or only "foreground" without masks
    test_images: np.ndarray  # (m, C, H, W) float32 in [0, 1]; m = 0 without [test]
    test_labels: np.ndarray  # (m,) int64
    delta: float
    seed: int
    synthesis: dict[str, Any]
    mask_rule: str = "none"

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(self.policy)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.references.shape[1:])


def object_masks(masks: np.ndarray, objects: tuple[str, ...] = OBJECTS) -> dict[str, np.ndarray]:
    """Each object's region: foreground = masks, background = ~masks; pass `task.objects` so that a task
    without masks (one object) gets no empty background."""
    regions = {"foreground": masks, "background": ~masks}
    return {o: regions[o] for o in objects}


def load_task(path: Path, image_shape: tuple[int, int, int]) -> CustomTask:
    path = Path(path)
    raw = read_toml(path, "task file")
    spec = _Spec(path)
    spec.no_unknown(raw, TOP_KEYS, "top level")
    name = spec.string(raw, "name", None)
    seed = spec.integer(raw, "seed", -1)
    if seed < -1:
        raise ConfigError(f"{path}: seed must be >= 0, or -1 for OS randomness, got {seed}")
    mask_rule = spec.string(raw, "mask_rule", "none")
    threshold = spec.mask_threshold(mask_rule)
    delta = spec.number(raw, "delta", 1e-5)
    if not 0 < delta < 1:
        raise ConfigError(f"{path}: delta must be in (0, 1), got {delta}")
    class_names, prototypes, class_tables = spec.classes(raw)
    policy = spec.policy(raw, mask_rule)
    images, labels, masks = _References(spec, tuple(image_shape), mask_rule).load(raw, class_tables)
    if threshold is not None:
        masks = images.mean(axis=1) > threshold
    elif masks is None:
        masks = np.ones((len(images), *images.shape[2:]), dtype=bool)
    test_images, test_labels = spec.test(raw, tuple(image_shape), len(class_names))
    return CustomTask(name=name, path=path, class_names=class_names,
                      prototypes=prototypes, references=images, reference_labels=labels, masks=masks,
                      policy=policy, test_images=test_images, test_labels=test_labels, delta=delta,
                      seed=seed, synthesis=spec.synthesis(raw), mask_rule=mask_rule)


class _Spec:
    """Typed reads of the TOML tables, each error naming the task file and the field."""

    def __init__(self, path: Path):
        self.path = path
        self.folder = path.parent

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def no_unknown(self, table: dict, known: tuple[str, ...], where: str) -> None:
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise self.fail(f"unknown key {unknown[0]!r} in {where} (known: {', '.join(known)})")

    def table(self, raw: dict, key: str) -> dict:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{key} must be a table, got {value!r}")
        return value

    def string(self, raw: dict, key: str, default: str | None, where: str = "") -> str:
        if key not in raw:
            if default is None:
                raise self.fail(f"{where}{key} is required")
            return default
        value = raw[key]
        if not isinstance(value, str) or not value:
            raise self.fail(f"{where}{key} must be a non-empty string, got {value!r}")
        return value

    def integer(self, raw: dict, key: str, default: int, where: str = "") -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"{where}{key} must be an integer, got {value!r}")
        return value

    def number(self, raw: dict, key: str, default: float, where: str = "") -> float:
        value = raw.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(f"{where}{key} must be a number, got {value!r}")
        return float(value)

    def file(self, relative: Any, field: str) -> Path:
        if not isinstance(relative, str) or not relative:
            raise self.fail(f"{field} must be a file path, got {relative!r}")
        file = self.folder / relative
        if not file.is_file():
            raise DataError(f"{file}: file not found ({field} in {self.path})")
        return file

    def mask_threshold(self, mask_rule: str) -> float | None:
        if mask_rule in ("file", "none"):
            return None
        kind, _, text = mask_rule.partition(":")
        try:
            threshold = float(text) if kind == "threshold" else math.nan
        except ValueError:
            threshold = math.nan
        if not 0 < threshold < 1:
            raise self.fail(f"mask_rule must be one of {', '.join(MASK_RULES)} with T in (0, 1), got {mask_rule!r}")
        return threshold

    def policy(self, raw: dict, mask_rule: str) -> dict[str, ObjectPolicy]:
        if "levels" not in raw:
            raise self.fail("[levels] is required, with foreground and background")
        levels = self.table(raw, "levels")
        epsilons = self.table(raw, "embedding_epsilon")
        self.no_unknown(levels, OBJECTS, "levels")
        self.no_unknown(epsilons, OBJECTS, "embedding_epsilon")
        policy = {}
        for o in OBJECTS:
            level = self.string(levels, o, None, "levels.")
            if level not in LEVELS:
                raise self.fail(f"levels.{o} must be one of {', '.join(LEVELS)}, got {level!r}")
            epsilon = self.number(epsilons, o, 0.0, "embedding_epsilon.")
            if not (epsilon >= 0 and math.isfinite(epsilon)):
                raise self.fail(f"embedding_epsilon.{o} must be a finite number >= 0, got {epsilon}")
            policy[o] = ObjectPolicy(level, epsilon)
        if mask_rule == "none":
            if policy["foreground"] != policy["background"]:
                raise self.fail("the foreground and background policies differ, so the task needs masks: set "
                                "mask_rule = 'file' or 'threshold:T'")
            del policy["background"]
        return policy

    def classes(self, raw: dict) -> tuple[list[str], list[int], list[dict]]:
        tables = raw.get("classes")
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise self.fail("[[classes]] is required: one table per class")
        known = ARCHIVE_CLASS_KEYS if "references" in raw else CLASS_KEYS
        names, prototypes = [], []
        for i, table in enumerate(tables):
            where = f"classes[{i}]."
            self.no_unknown(table, known, f"classes[{i}]")
            name = self.string(table, "name", None, where)
            if name in names:
                raise self.fail(f"duplicate class name {name!r} in {where[:-1]}")
            prototype = self.integer(table, "prototype", -1, where)
            if prototype < -1:
                raise self.fail(f"{where}prototype must be >= 0 (or -1 for none), got {prototype}")
            names.append(name)
            prototypes.append(prototype)
        return names, prototypes, tables

    def test(self, raw: dict, image_shape: tuple[int, int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        if "test" not in raw:
            return np.zeros((0, *image_shape), dtype=np.float32), np.zeros(0, dtype=np.int64)
        table = self.table(raw, "test")
        self.no_unknown(table, TEST_KEYS, "test")
        file = self.file(table.get("images"), "test.images")
        arrays = _read_npz(file, ("images", "labels"))
        images = _check_shape(_to_float_images(arrays["images"], file, batched=True), image_shape, file)
        labels = _labels(arrays["labels"], len(images), num_classes, file)
        return images, labels

    def synthesis(self, raw: dict) -> dict[str, Any]:
        knobs = self.table(raw, "synthesis")
        for key, value in knobs.items():
            if not isinstance(value, (bool, int, float, str)):
                raise self.fail(f"synthesis.{key} must be a number, string or boolean, got {value!r}")
        return dict(knobs)


class _References:
    """The reference images with labels and, under mask_rule = "file", their masks."""

    def __init__(self, spec: _Spec, image_shape: tuple[int, int, int], mask_rule: str):
        self.spec, self.image_shape, self.mask_rule = spec, image_shape, mask_rule

    def load(self, raw: dict, classes: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if "references" in raw:
            return self.from_archive(self.spec.file(raw["references"], "references"), [c["name"] for c in classes])
        images, labels, masks = [], [], []
        for c, table in enumerate(classes):
            where = f"classes[{c}]"
            files = self.file_list(table, "references", where)
            if not files:
                raise self.spec.fail(f"{where} ({table['name']!r}) has no references")
            mask_files = self.file_list(table, "masks", where)
            if self.mask_rule == "file" and len(mask_files) != len(files):
                raise self.spec.fail(f"mask_rule = 'file' needs one mask per reference: {where} has {len(files)} "
                                     f"references and {len(mask_files)} masks")
            if self.mask_rule != "file" and mask_files:
                raise self.spec.fail(f"{where}.masks are given but mask_rule = {self.mask_rule!r} ignores them "
                                     "(use mask_rule = 'file')")
            for file in files:
                images.append(_check_shape(_read_image(file), self.image_shape, file))
                labels.append(c)
            for file, image in zip(mask_files, images[-len(files):]):
                masks.append(_check_mask(_read_mask(file), image.shape[1:], file))
        return (np.stack(images), np.asarray(labels, dtype=np.int64),
                np.stack(masks) if self.mask_rule == "file" else None)

    def file_list(self, table: dict, key: str, where: str) -> list[Path]:
        entries = table.get(key, [])
        if not isinstance(entries, list):
            raise self.spec.fail(f"{where}.{key} must be a list of file paths, got {entries!r}")
        return [self.spec.file(e, f"{where}.{key}[{i}]") for i, e in enumerate(entries)]

    def from_archive(self, file: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        arrays = _read_npz(file, ("images", "labels"), optional=("masks",))
        images = _check_shape(_to_float_images(arrays["images"], file, batched=True), self.image_shape, file)
        labels = _labels(arrays["labels"], len(images), len(class_names), file)
        for c, name in enumerate(class_names):
            if not (labels == c).any():
                raise DataError(f"{file}: class {name!r} (label {c}) has no references")
        if self.mask_rule == "file" and "masks" not in arrays:
            raise DataError(f"{file}: mask_rule = 'file' needs an array `masks` (n, H, W)")
        if self.mask_rule != "file" and "masks" in arrays:
            raise self.spec.fail(f"{file.name} holds masks but mask_rule = {self.mask_rule!r} ignores them "
                                 "(use mask_rule = 'file')")
        if "masks" not in arrays:
            return images, labels, None
        masks = arrays["masks"]
        if masks.shape != (len(images), *images.shape[2:]):
            raise DataError(f"{file}: masks have shape {masks.shape}, expected {(len(images), *images.shape[2:])} "
                            "(one (H, W) mask per image)")
        return images, labels, masks != 0


def _read_npz(file: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file}: cannot read the archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file}: expected an .npz archive with arrays {', '.join(required)}")
    with archive:
        missing = [k for k in required if k not in archive.files]
        if missing:
            raise DataError(f"{file}: missing arrays {missing} (needs {', '.join(required)})")
        try:
            return {k: archive[k] for k in (*required, *optional) if k in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{file}: cannot read the archive: {exc}") from None


def _read_image(file: Path) -> np.ndarray:
    if file.suffix.lower() == ".npy":
        return _to_float_images(_read_npy(file), file, batched=False)
    try:
        with Image.open(file) as image:
            if image.mode in ("1", "LA"):
                image = image.convert("L")
            elif image.mode not in GRAY_MODES and image.mode != "RGB":
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable image: {exc}") from None
    if pixels.dtype == np.int32:  # 16-bit greyscale that PIL opened as mode "I"
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"{file}: 32-bit integer pixels are not supported")
        pixels = pixels.astype(np.uint16)
    return _to_float_images(pixels if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0), file, batched=False)


def _read_mask(file: Path) -> np.ndarray:
    if file.suffix.lower() == ".npy":
        return _read_npy(file) != 0
    try:
        with Image.open(file) as image:
            if image.mode not in GRAY_MODES:
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable mask image: {exc}") from None
    return pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0


def _read_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read the array: {exc}") from None


def _to_float_images(pixels: np.ndarray, file: Path, batched: bool) -> np.ndarray:
    """(n,) (C,) H, W in uint8, uint16 or floats in [0, 1] -> float32 (n,) C, H, W in [0, 1]."""
    if pixels.ndim not in ((3, 4) if batched else (2, 3)):
        shape = "(n, H, W) or (n, C, H, W)" if batched else "(H, W) or (C, H, W)"
        raise DataError(f"{file}: images must be {shape}, got shape {pixels.shape}")
    if pixels.ndim == (3 if batched else 2):
        pixels = np.expand_dims(pixels, -3)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535
    if not np.issubdtype(pixels.dtype, np.floating):
        raise DataError(f"{file}: pixels must be uint8, uint16 or floats in [0, 1], got {pixels.dtype}")
    if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise DataError(f"{file}: float pixels must lie in [0, 1], got [{np.nanmin(pixels):g}, {np.nanmax(pixels):g}]")
    return pixels.astype(np.float32)


def _check_shape(images: np.ndarray, expected: tuple[int, int, int], file: Path) -> np.ndarray:
    channels, size = images.shape[-3], images.shape[-2:]
    if tuple(size) != expected[1:]:
        raise DataError(f"{file}: image is {size[0]}x{size[1]}, expected {expected[1]}x{expected[2]} (H x W)")
    if channels != expected[0]:
        raise DataError(f"{file}: image has {channels} channels, expected {expected[0]}")
    return images


def _check_mask(mask: np.ndarray, size: tuple[int, int], file: Path) -> np.ndarray:
    if mask.shape != tuple(size):
        raise DataError(f"{file}: mask has shape {mask.shape}, expected {tuple(size)} like its image")
    return mask


def _labels(labels: np.ndarray, count: int, num_classes: int, file: Path) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: labels must be {count} integers (one per image), got {labels.dtype} {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{file}: labels must be in [0, {num_classes}) (indices into [[classes]]), "
                        f"got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)
