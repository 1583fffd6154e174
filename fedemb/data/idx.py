"""Reader for the IDX format (MNIST, Fashion-MNIST, EMNIST, QMNIST), plain or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedemb.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {p}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"not an IDX file (bad magic number): {p}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"corrupt IDX header in {p}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"corrupt IDX file {p}: header says {dims} ({expected} bytes of data), "
                        f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(directory: Path, split: str, kind: str) -> Path:
    """train/t10k images/labels under the names MNIST-style packages use."""
    ndim = "3" if kind == "images" else "1"
    for pattern in (f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            p = directory / f"{pattern}{suffix}"
            if p.is_file():
                return p
    raise DataError(f"no {split} {kind} IDX file in {directory} (expected {split}-{kind}-idx{ndim}-ubyte[.gz])")


def read_qmnist_writers(path: str | Path, rows: int) -> np.ndarray:
    """Writer ids (column 2) of the QMNIST extended labels, for the first `rows` images."""
    table = read_idx(path)
    if table.ndim != 2 or table.shape[1] != 8:
        raise DataError(f"{path}: expected QMNIST extended labels (rows x 8), got shape {table.shape}")
    if table.shape[0] < rows:
        raise DataError(f"{path}: has {table.shape[0]} rows, the images need {rows}")
    return table[:rows, 2].astype(np.int64), table[:rows, 0].astype(np.int64)
