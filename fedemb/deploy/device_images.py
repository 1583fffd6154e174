"""A device's data file (fedemb.deploy.device_data) made from its owner's labelled images:

    photos/0/a.jpg photos/0/b.png photos/1/c.bmp ...      one subfolder per class, named by its id
    photos/cat/... photos/dog/... with classes cat,dog     or by name, ids given by the order of `classes`

Every image is read with Pillow whatever its format, mode and size: turned upright as its EXIF says,
transparent pixels laid on white (as on a page), converted to grayscale ("L") or "RGB", and resized
(stretched) to `size` when one is given; without one, all images must already agree in size. Arrays
someone already has (x.npy, y.npy) go through the same checks.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedemb.data.npz_format import ImageArrays, checked_arrays
from fedemb.errors import DataError

MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class ImageFolder:
    """Where images are and how to read them: `size` (height, width) or None to keep, `channels` 1 or 3,
    `classes` the class names in id order or None when the subfolders are named by id."""
    root: Path
    size: tuple[int, int] | None = None
    channels: int = 1
    classes: tuple[str, ...] | None = None


def parse_size(text: str) -> tuple[int, int]:
    """"28x28" → (28, 28): height x width."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise DataError(f"size must be HEIGHTxWIDTH in pixels, like 28x28, got {text!r}")
    return int(match[1]), int(match[2])


def parse_classes(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise DataError(f"classes must be comma-separated folder names, got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"class names given more than once: {', '.join(repeated)}")
    return names


def class_ids(folder: ImageFolder) -> dict[Path, int]:
    """Each class subfolder and its label."""
    if not folder.root.is_dir():
        raise DataError(f"{folder.root}: no such folder")
    entries = [p for p in sorted(folder.root.iterdir()) if not p.name.startswith(".")]
    strays = [p for p in entries if not p.is_dir()]
    if strays:
        raise DataError(f"{strays[0]}: images go in one subfolder per class, not in {folder.root} itself")
    if not entries:
        raise DataError(f"{folder.root} is empty: put the images in one subfolder per class")
    ids = {}
    for sub in entries:
        if folder.classes is not None:
            if sub.name not in folder.classes:
                raise DataError(f"{sub}: class folder {sub.name!r} is not among the classes {','.join(folder.classes)}")
            ids[sub] = folder.classes.index(sub.name)
        elif sub.name.isdigit() and sub.name.isascii():
            ids[sub] = int(sub.name)
        else:
            raise DataError(f"{sub}: class folder {sub.name!r} is not an integer class id "
                            "(name the classes in order with --classes)")
    same = [sub.name for sub, label in ids.items() if list(ids.values()).count(label) > 1]
    if same:
        raise DataError(f"{folder.root}: class folders {', '.join(same)} mean the same class")
    return ids


def read_image(file: Path, folder: ImageFolder) -> np.ndarray:
    """(C, H, W) uint8."""
    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        reason = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"{file}: {reason}") from None
    mode = MODES[folder.channels]
    image = _as_mode(image, mode, file)
    if folder.size is not None and image.size != (folder.size[1], folder.size[0]):
        image = image.resize((folder.size[1], folder.size[0]), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _as_mode(image: Image.Image, mode: str, file: Path) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion clips 16-bit values at 255
        eight_bit = (np.asarray(image, dtype=np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit, "L")
    elif image.mode == "F":
        raise DataError(f"{file}: floating-point images (mode F) are not supported: save it with 8 or 16 bits")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert(mode)


def read_image_folder(folder: ImageFolder, user: int) -> tuple[ImageArrays, dict[int, int]]:
    """The folder's images as device data of `user`, and the number of examples of each class id."""
    ids = class_ids(folder)
    files = [(f, label) for sub, label in ids.items() for f in _visible_files(sub)]
    if not files:
        raise DataError(f"{folder.root} has no images in its class folders")
    images, labels = [], []
    for file, label in files:
        pixels = read_image(file, folder)
        if images and pixels.shape != images[0].shape:
            raise DataError(f"{file} is {_hxw(pixels.shape[1:])} but {files[0][0]} is {_hxw(images[0].shape[1:])}: "
                            "give --size HxW to resize them all")
        images.append(pixels)
        labels.append(label)
    data = checked_arrays(np.stack(images), np.asarray(labels, dtype=np.int64),
                          np.full(len(labels), user, dtype=np.int64), str(folder.root))
    return data, _counts(data.labels)


def read_arrays(x_file: Path, y_file: Path, user: int) -> tuple[ImageArrays, dict[int, int]]:
    """Arrays someone already has: x (n, H, W) or (n, C, H, W), uint8 or float in [0, 1]; y labels."""
    x, y = (_load_npy(f) for f in (x_file, y_file))
    data = checked_arrays(x, y, np.full(len(y.reshape(-1)), user, dtype=np.int64), f"{x_file}, {y_file}")
    return data, _counts(data.labels)


def checked_output(out: Path) -> Path:
    if out.suffix != ".npz":
        raise DataError(f"{out}: the data file's name must end in .npz")
    if out.is_dir():
        raise DataError(f"{out} is a folder: give the data file's name")
    return out


def write_device_file(data: ImageArrays, out: Path) -> None:
    """Written whole or not at all: a temporary file in the same folder, then renamed."""
    checked_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=data.images, y=data.labels, user=data.users)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _visible_files(folder: Path) -> list[Path]:
    """Files under `folder`, hidden ones (.DS_Store, .thumbnails/...) left out."""
    return [f for f in sorted(folder.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def _load_npy(file: Path) -> np.ndarray:
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {file} as a .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise DataError(f"{file} is an .npz archive, not one .npy array")
    return array


def _counts(labels: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(labels, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def _hxw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"
