"""Where a machine keeps what it derives from a dataset (the split store, decoded or converted images), and the
fingerprint of the files it was derived from: a changed file gets a new key, hence a new directory.
Location: `data.cache_dir`, else $FEDEMB_CACHE_DIR, else ~/.cache/fedemb."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cache_root(data_cfg) -> Path:
    root = data_cfg.cache_dir or os.environ.get("FEDEMB_CACHE_DIR") or "~/.cache/fedemb"
    return Path(root).expanduser()


def file_stats(files: list[Path]) -> list[list]:
    """(resolved path, size, mtime in ns) of each file; a missing one is kept by name for its loader to report."""
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([str(f), None, None])
    return stats


def key_of(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def cached_array(target: Path, build: Callable[[Path], None]) -> np.ndarray:
    """`target` memory-mapped, built first by `build(path)` unless it exists. The array is written to a
    temporary file beside it and renamed, so a crash never leaves a half-written cache entry."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".npy", dir=target.parent)
        os.close(fd)
        try:
            build(Path(temporary))
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")
