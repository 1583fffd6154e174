"""A folder tree of image files (torchvision's ImageFolder layout) as a dataset: `data.name = "folder"`.

    root/cat/001.jpg root/dog/a/002.png ...          classes: the folder under the root
    root/alice/cat/001.jpg root/bob/dog/7.png ...    data.user_from = "folder": a user level above the classes
    path,user[,label]  (data.manifest, a CSV)         users, and optionally labels, per file under the root

Names become ids by one rule, for classes and users alike: names that are all non-negative integers are
the ids themselves; otherwise the sorted names are 0..K-1. Without a manifest or user folders, users are
synthetic (data.partition), as for an .npz without `user`.

The images are decoded once per version of the files: into `<cache>/folder-images-<key>.npy`, an
(n, C, H, W) uint8 array keyed by the decoding settings and the size and mtime of every file decoded. The
split store (fedemb.data.store) is then built from that memory-mapped array as from an .npy directory.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.data.cache import cache_root, cached_array, file_stats, key_of
from fedemb.data.image_files import hxw, parse_size, read_header, read_image, visible_files
from fedemb.errors import DataError

DECODED_VERSION = 1
INTEGER = re.compile(r"[0-9]+")
LAYOUTS = {"classes": "root/<class>/<file>", "users": "root/<user>/<class>/<file>"}


@dataclass(frozen=True)
class Listing:
    """The files of the dataset in a fixed order, with their labels and users."""
    files: list[Path]
    labels: np.ndarray  # (n,) int64
    users: np.ndarray | None  # (n,) int64; None: synthetic users
    class_names: dict[int, str]
    users_from: str  # for the log line


def manifest_path(cfg) -> Path:
    """data.manifest, relative to the root unless absolute."""
    return Path(cfg.path) / Path(cfg.manifest).expanduser()


def source_files(cfg) -> list[Path]:
    """Every file the dataset may read: the store is rebuilt when any of them changes."""
    root = Path(cfg.path)
    files = visible_files(root) if cfg.path and root.is_dir() else []
    if cfg.manifest and manifest_path(cfg) not in files:
        files.append(manifest_path(cfg))
    return files


def list_folder(cfg) -> Listing:
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.path must be the root folder of the images, got {cfg.path!r}: no such folder")
    if cfg.manifest:
        return _from_manifest(root, manifest_path(cfg))
    if cfg.user_from == "folder":
        return _from_folders(root, with_users=True)
    return _from_folders(root, with_users=False)


def decoded_images(cfg, files: list[Path]) -> np.ndarray:
    """The files' images as a memory-mapped (n, C, H, W) uint8 array, decoded now unless already cached."""
    key = key_of({"version": DECODED_VERSION, "image_size": cfg.image_size, "channels": cfg.channels, "resize": cfg.resize,
                  "files": file_stats(files)})
    return cached_array(cache_root(cfg) / f"folder-images-{key}.npy",
                        lambda out: _decode(files, cfg.image_size, cfg.channels, out, crop=cfg.resize == "crop"))


def _decode(files: list[Path], image_size: str, channels: int, out: Path, crop: bool = False) -> None:
    """Headers first (sizes that disagree and unreadable files are found before any pixel is decoded),
    then every image straight into the memory-mapped file."""
    headers = [read_header(f) for f in files]
    size = parse_size(image_size, "data.image_size") if image_size else None
    if size is None:
        size = (headers[0].height, headers[0].width)
        for file, h in zip(files, headers):
            if (h.height, h.width) != size:
                raise _sizes_differ(file, (h.height, h.width), files[0], size)
    channels = channels or (3 if any(h.colour for h in headers) else 1)
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(files), channels, *size))
    for i, file in enumerate(files):
        pixels = read_image(file, size if image_size else None, channels, crop)
        if pixels.shape[1:] != size:  # turned by an EXIF orientation that its header did not show
            raise _sizes_differ(file, pixels.shape[1:], files[0], size)
        images[i] = pixels
    images.flush()
    del images


def _sizes_differ(file: Path, shape, first: Path, first_shape) -> DataError:
    return DataError(f"{file} is {hxw(shape)} but {first} is {hxw(first_shape)}: "
                     'set data.image_size = "HxW" to resize them all')


def _ids(names, what: str, where: Path) -> dict[str, int]:
    """Names that are all integers are the ids; otherwise the sorted names are 0..K-1."""
    names = sorted(set(names))
    if not all(INTEGER.fullmatch(n) for n in names):
        return {n: i for i, n in enumerate(names)}
    ids = {n: int(n) for n in names}
    repeats = Counter(ids.values())
    same = [n for n in names if repeats[ids[n]] > 1]
    if same:
        raise DataError(f"{where}: {what} {', '.join(same)} mean the same id")
    return ids


def _from_folders(root: Path, with_users: bool) -> Listing:
    """root/<class>/** or root/<user>/<class>/**; files in the root itself are left out (a README, a manifest)."""
    rows = []  # (file, class name, user name)
    for top in _subfolders(root):
        if not with_users:
            rows += [(f, top.name, None) for f in visible_files(top)]
            continue
        strays = [f for f in top.iterdir() if f.is_file() and not f.name.startswith(".")]
        if strays:
            raise DataError(f"{sorted(strays)[0]}: with data.user_from = \"folder\" images go in {LAYOUTS['users']}")
        for sub in _subfolders(top):
            rows += [(f, sub.name, top.name) for f in visible_files(sub)]
    if not rows:
        raise DataError(f"{root} has no images in the layout {LAYOUTS['users' if with_users else 'classes']}")
    classes = _ids((c for _, c, _ in rows), "class folders", root)
    users = _ids((u for _, _, u in rows), "user folders", root) if with_users else None
    return Listing([f for f, _, _ in rows], np.array([classes[c] for _, c, _ in rows], dtype=np.int64),
                   None if users is None else np.array([users[u] for _, _, u in rows], dtype=np.int64),
                   {i: c for c, i in classes.items()},
                   f"{len(users)} user folders" if users else "synthetic")


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _from_manifest(root: Path, manifest: Path) -> Listing:
    header, rows = _read_csv(manifest)
    missing = [c for c in ("path", "user") if c not in header]
    if missing:
        raise DataError(f"{manifest}: needs the columns path and user (and optionally label); "
                        f"its header is {','.join(header) or 'empty'}")
    if not rows:
        raise DataError(f"{manifest}: no rows after the header")
    column = {name: header.index(name) for name in ("path", "user", "label") if name in header}
    files, classes, users, seen = [], [], [], {}
    for line, values in rows:
        where = f"{manifest} line {line}"
        if len(values) != len(header):
            raise DataError(f"{where}: {len(values)} fields but the header has {len(header)}")
        path, user = values[column["path"]], values[column["user"]]
        if not path or not user:
            raise DataError(f"{where}: empty {'path' if not path else 'user'}")
        file = root / path
        if not file.is_file():
            raise DataError(f"{where}: {path} does not exist under {root}")
        if file in seen:
            raise DataError(f"{where}: {path} is listed again (first on line {seen[file]})")
        seen[file] = line
        if "label" in column:
            label = values[column["label"]]
            if not INTEGER.fullmatch(label):
                raise DataError(f"{where}: label {label!r} is not a non-negative integer class id")
            classes.append(label)
        elif len(Path(path).parts) < 2:
            raise DataError(f"{where}: {path} is not in a class folder (<class>/<file>) and the manifest has no "
                            "label column")
        else:
            classes.append(Path(path).parts[0])
        files.append(file)
        users.append(user)
    class_ids = {c: int(c) for c in classes} if "label" in column else _ids(classes, "class folders", root)
    user_ids = _ids(users, "user ids", manifest)
    return Listing(files, np.array([class_ids[c] for c in classes], dtype=np.int64),
                   np.array([user_ids[u] for u in users], dtype=np.int64), {i: c for c, i in class_ids.items()},
                   f"{len(user_ids)} users from {manifest.name}")


def _read_csv(file: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers), every field stripped."""
    if not file.is_file():
        raise DataError(f"data.manifest: {file}: no such file")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, [v.strip() for v in row]) for row in reader if any(v.strip() for v in row)]
    except UnicodeDecodeError:
        raise DataError(f"{file}: the manifest is not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{file}: not a readable CSV file ({exc})") from None
    return header, rows
