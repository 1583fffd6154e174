"""A device's data file (fedemb.deploy.device_data) made from its owner's labelled images:

    photos/0/a.jpg photos/0/b.png photos/1/c.bmp ...      one subfolder per class, named by its id
    photos/cat/... photos/dog/... with classes cat,dog     or by name, ids given by the order of `classes`

Every image is read by fedemb.data.image_files (any format, mode and size; upright, transparency on white,
grayscale or RGB) and resized to `size` when one is given; without one, all images must already agree in
size. Arrays someone already has (x.npy, y.npy) go through the same checks.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.data.image_files import hxw, read_image, visible_files
from fedemb.data.npz_format import ImageArrays, checked_arrays
from fedemb.errors import DataError


@dataclass(frozen=True)
class ImageFolder:
    """Where images are and how to read them: `size` (height, width) or None to keep, `channels` 1 or 3,
    `classes` the class names in id order or None when the subfolders are named by id."""
    root: Path
    size: tuple[int, int] | None = None
    channels: int = 1
    classes: tuple[str, ...] | None = None


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


def read_image_folder(folder: ImageFolder, user: int) -> tuple[ImageArrays, dict[int, int]]:
    """The folder's images as device data of `user`, and the number of examples of each class id."""
    ids = class_ids(folder)
    files = [(f, label) for sub, label in ids.items() for f in visible_files(sub)]
    if not files:
        raise DataError(f"{folder.root} has no images in its class folders")
    images, labels = [], []
    for file, label in files:
        pixels = read_image(file, folder.size, folder.channels)
        if images and pixels.shape != images[0].shape:
            raise DataError(f"{file} is {hxw(pixels.shape[1:])} but {files[0][0]} is {hxw(images[0].shape[1:])}: "
                            "give --size HxW to resize them all")
        images.append(pixels)
        labels.append(label)
    data = checked_arrays(np.stack(images), np.asarray(labels, dtype=np.int64),
                          np.full(len(labels), user, dtype=np.int64), str(folder.root))
    return data, _counts(data.labels)


def read_arrays(x_file: Path, y_file: Path, user: int) -> tuple[ImageArrays, dict[int, int]]:
    """Arrays someone already has: x (n, H, W), (n, H, W, C) or (n, C, H, W), uint8 or float in [0, 1]; y labels."""
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
