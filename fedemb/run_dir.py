"""The run directory: config.toml (resolved), results.json, checkpoints/, tensorboard/, private/.

What a user may publish (results.json, privacy.json, tensorboard/, the final model, report tables) holds
only DP releases recorded in the ledger and data-independent facts. Exact statistics of the private data
(per-round telemetry, timings, failure counts, non-private baselines) go under private/, which is
server-private and never to be published; checkpoints/state.pt is server-private too.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from fedemb.config import Config, to_toml

LEDGER_FILE = "privacy.json"
STATE_FILE = "checkpoints/state.pt"
PRIVATE_DIR = "private"
PRIVATE_README = """Server-private: exact statistics of the private data (telemetry, timings, failure counts,
non-private baselines). Nothing here is a DP release: never publish this folder.
"""


def new_run_dir(cfg: Config, run_dir: str | None) -> Path:
    if run_dir:
        path = Path(run_dir)
    else:
        path = Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while path.exists():
            path = Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
            suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(to_toml(cfg))
    return path.resolve()


def write_json(path: Path, data: dict) -> None:
    """Atomic and durable: a reader never sees half a file, and a crash right after leaves the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(_finite(data), indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def private_dir(run_dir: Path) -> Path:
    """The run's server-private folder, created with a README that says what it is."""
    path = Path(run_dir) / PRIVATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    readme = path / "README.txt"
    if not readme.exists():
        readme.write_text(PRIVATE_README)
    return path


def write_private_json(run_dir: Path, name: str, data: dict) -> Path:
    """Server-private JSON (atomic), e.g. the exact accuracy of a non-private baseline."""
    path = private_dir(run_dir) / name
    write_json(path, {"server_private": True, **data})
    return path


def append_private_jsonl(run_dir: Path, name: str, record: dict) -> None:
    """One server-private JSON line, flushed (e.g. a round's exact telemetry)."""
    with open(private_dir(run_dir) / name, "a") as f:
        f.write(json.dumps(_finite(record), sort_keys=True) + "\n")
        f.flush()


def _finite(x):
    """JSON has no inf/nan: write them as strings, which json readers can still parse as floats."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def save_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_state(path, {k: v.detach().cpu() for k, v in state.items()})


def save_state(path: Path, state: dict) -> None:
    """torch.save, atomically: a kill during the write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
