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
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator, model_validator

from fedemb.config import read_toml
from fedemb.errors import ConfigError, DataError
from fedemb.typed_config import Settings, parse

OBJECTS = ("foreground", "background")
Level = Literal["L0", "L1", "L2"]
LEVELS: tuple[str, ...] = typing.get_args(Level)

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class CustomSettings(Settings):
    """The task's optional [synthesis] table: how the server synthesises images for it (`fedemb synth
    custom`). The device sends it with the payload; the server validates it again."""

    images_per_reference: int = Field(16, ge=1)
    """synthetic copies per reference image, each with its own random shift"""
    steps: int = Field(300, ge=0)
    """Adam steps"""
    lr: float = Field(0.1, gt=0)
    """Adam learning rate"""
    shift: int = Field(2, ge=0)
    """pixels of random shift per copy (zero fill)"""
    weight_edges: float = Field(20.0, ge=0)
    """weight of the L1 objects' edge-map term"""
    weight_embedding: float = Field(1.0, ge=0)
    """weight of the DP-embedding term (scaled down for noisy releases)"""
    weight_class: float = Field(1.0, ge=0)
    """weight of the class term toward the class anchors"""
    weight_statistics: float = Field(0.1, ge=0)
    """weight of the DP activation-statistics prior (used only with --statistics)"""
    weight_tv: float = Field(0.01, ge=0)
    """weight of total variation"""
    weight_l2: float = Field(0.0001, ge=0)
    """weight of the pixels' L2 norm"""
    temperature: float = Field(0.1, gt=0)
    """of the class term's softmax over cosine similarities"""
    jitter: int = Field(1, ge=0)
    """random shift per step, in pixels"""
    init_scale: float = Field(0.5, ge=0)
    """std of the noise the unshared pixels start from (model scale, [-1, 1])"""
    model: Literal["head", "scratch"] = "head"
    """the specialised model: head (linear, on the frozen private encoder) or scratch"""
    train_epochs: int = Field(60, ge=1)
    """epochs of the specialised model"""
    train_lr: float = Field(0.003, gt=0)
    """its learning rate"""


class _SynthesisTable(Settings):
    synthesis: CustomSettings = Field(default_factory=CustomSettings)


def custom_settings(raw: dict, where: str) -> CustomSettings:
    """The task's [synthesis] table over the defaults; a typo or a bad value is a one-line error."""
    return parse(_SynthesisTable, {"synthesis": raw}, where).synthesis


class ObjectLevels(Settings):
    """How much of each object may leave the device: L0 nothing, L1 its edge map, L2 its pixels."""

    foreground: Level
    """the masked object (the whole image under mask_rule = "none")"""
    background: Level
    """the rest of the image"""


class ObjectEpsilons(Settings):
    """Per object: share a DP embedding of it at this ε (0: none)."""

    foreground: float = Field(0.0, ge=0, allow_inf_nan=False)
    """ε of the foreground's DP embedding"""
    background: float = Field(0.0, ge=0, allow_inf_nan=False)
    """ε of the background's DP embedding"""


class TaskClass(Settings):
    """A [[classes]] table: one class of the task and its reference images."""

    name: str = Field(min_length=1)
    """the class's name"""
    prototype: int = Field(-1, ge=-1)
    """class index of the federated model whose DP prototype anchors this class; -1: none"""
    references: list[str] = Field(default_factory=list)
    """PNG/JPEG (PIL) or .npy (H, W) / (C, H, W) files, relative to the task file (not with an archive)"""
    masks: list[str] = Field(default_factory=list)
    """one mask per reference iff mask_rule = "file"; nonzero = foreground"""


class TaskTest(Settings):
    """The optional [test] table; it stays on the device."""

    images: str = Field(min_length=1)
    """an .npz with images (n, [C,] H, W) and labels (n,)"""


class TaskSpec(Settings):
    """A customized-synthesis task file (`fedemb-device task`, `fedemb synth custom --task`). Paths are
    relative to the file's folder."""

    name: str = Field(min_length=1)
    """the task's name"""
    delta: float = Field(1e-5, gt=0, lt=1)
    """δ of the DP embeddings"""
    mask_rule: str = "none"
    """"file" (masks listed per class), "threshold:T" (foreground = mean pixel above T, T in (0, 1)) or
    "none" (the whole image is one object, `foreground`)"""
    seed: int = Field(-1, ge=-1)
    """-1: OS randomness; >= 0: reproducible noise"""
    levels: ObjectLevels
    """required: the level of each object"""
    embedding_epsilon: ObjectEpsilons = Field(default_factory=ObjectEpsilons)
    classes: list[TaskClass] = Field(min_length=1)
    """one [[classes]] table per class"""
    references: str = ""
    """instead of per-class lists: one .npz with images (n, [C,] H, W), labels (n,) and, iff mask_rule =
    "file", masks (n, H, W); the classes then have only name and prototype"""
    test: TaskTest | None = None
    synthesis: CustomSettings = Field(default_factory=CustomSettings)

    @field_validator("mask_rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        mask_threshold(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        names = [c.name for c in self.classes]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"duplicate class name {name!r} in classes[{i}]")
        if self.references:
            for i, c in enumerate(self.classes):
                if c.references or c.masks:
                    raise ValueError(f"classes[{i}] lists files, but the references come from the archive "
                                     f"{self.references!r}: a class then has only name and prototype")
        if self.mask_rule == "none" and self.policy()["foreground"] != self.policy()["background"]:
            raise ValueError("the foreground and background policies differ, so the task needs masks: set "
                             "mask_rule = 'file' or 'threshold:T'")
        return self

    def policy(self) -> dict[str, ObjectPolicy]:
        return {o: ObjectPolicy(getattr(self.levels, o), getattr(self.embedding_epsilon, o)) for o in OBJECTS}


def mask_threshold(mask_rule: str) -> float | None:
    if mask_rule in ("file", "none"):
        return None
    kind, _, text = mask_rule.partition(":")
    try:
        threshold = float(text) if kind == "threshold" else math.nan
    except ValueError:
        threshold = math.nan
    if not 0 < threshold < 1:
        raise ValueError(f"must be one of file, threshold:T, none with T in (0, 1), got {mask_rule!r}")
    return threshold


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
    synthesis: dict[str, Any]  # the [synthesis] keys the task sets (validated; the server validates again)
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
    spec = parse(TaskSpec, read_toml(path, "task file"), str(path))
    files = _Files(path)
    policy = spec.policy()
    if spec.mask_rule == "none":
        del policy["background"]
    images, labels, masks = _References(files, tuple(image_shape), spec.mask_rule).load(spec)
    threshold = mask_threshold(spec.mask_rule)
    if threshold is not None:
        masks = images.mean(axis=1) > threshold
    elif masks is None:
        masks = np.ones((len(images), *images.shape[2:]), dtype=bool)
    test_images, test_labels = _test_split(files, spec.test, tuple(image_shape), len(spec.classes))
    return CustomTask(name=spec.name, path=path, class_names=[c.name for c in spec.classes],
                      prototypes=[c.prototype for c in spec.classes], references=images, reference_labels=labels,
                      masks=masks, policy=policy, test_images=test_images, test_labels=test_labels,
                      delta=spec.delta, seed=spec.seed, synthesis=spec.synthesis.model_dump(exclude_unset=True),
                      mask_rule=spec.mask_rule)


class _Files:
    """The task's files, relative to its folder; a missing one is a DataError naming the field."""

    def __init__(self, path: Path):
        self.path = path
        self.folder = path.parent

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def file(self, relative: str, field: str) -> Path:
        file = self.folder / relative
        if not file.is_file():
            raise DataError(f"{file}: file not found ({field} in {self.path})")
        return file


def _test_split(files: _Files, test: TaskTest | None, image_shape: tuple[int, int, int],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if test is None:
        return np.zeros((0, *image_shape), dtype=np.float32), np.zeros(0, dtype=np.int64)
    file = files.file(test.images, "test.images")
    arrays = _read_npz(file, ("images", "labels"))
    images = _check_shape(_to_float_images(arrays["images"], file, batched=True), image_shape, file)
    return images, _labels(arrays["labels"], len(images), num_classes, file)


class _References:
    """The reference images with labels and, under mask_rule = "file", their masks."""

    def __init__(self, files: _Files, image_shape: tuple[int, int, int], mask_rule: str):
        self.spec, self.image_shape, self.mask_rule = files, image_shape, mask_rule

    def load(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if task.references:
            return self.from_archive(self.spec.file(task.references, "references"), [c.name for c in task.classes])
        images, labels, masks = [], [], []
        for c, table in enumerate(task.classes):
            where = f"classes[{c}]"
            files = [self.spec.file(e, f"{where}.references[{i}]") for i, e in enumerate(table.references)]
            if not files:
                raise self.spec.fail(f"{where} ({table.name!r}) has no references")
            mask_files = [self.spec.file(e, f"{where}.masks[{i}]") for i, e in enumerate(table.masks)]
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
