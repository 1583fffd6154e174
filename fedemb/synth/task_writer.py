"""Write a customized-synthesis task (task.toml, refs.npz, test.npz) from one user's images.

The users: a NIST writer of MNIST t10k (QMNIST extended labels; disjoint from the training writers), or
a random set of scikit-learn digits standing in for one. fedemb.synth.task_spec reads what this writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedemb.data.idx import find_idx, read_idx, read_qmnist_writers
from fedemb.errors import DataError


def writer_images(mnist: Path, test_writers: Path, rank: int, min_per_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The images and labels of the writer with the rank-th most t10k images among those holding at
    least `min_per_class` of every digit."""
    images = read_idx(find_idx(mnist, "t10k", "images"))
    labels = read_idx(find_idx(mnist, "t10k", "labels")).astype(np.int64)
    writers, _ = read_qmnist_writers(test_writers, len(labels))
    eligible = [w for w in np.unique(writers)
                if np.bincount(labels[writers == w], minlength=10).min() >= min_per_class]
    if rank >= len(eligible):
        raise DataError(f"only {len(eligible)} writers hold {min_per_class}+ images of every digit")
    eligible.sort(key=lambda w: (-(writers == w).sum(), w))
    writer = int(eligible[rank])
    rows = np.flatnonzero(writers == writer)
    return images[rows], labels[rows], writer


def digits_images(seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.choice(np.flatnonzero(d.target == c), per_class, replace=False) for c in range(10)])
    return (d.images[rows] * (255 / 16)).round().astype(np.uint8), d.target[rows].astype(np.int64), -1


def write_task(out: Path, images: np.ndarray, labels: np.ndarray, references: int, levels: dict[str, str],
               epsilons: dict[str, float], threshold: float, seed: int, name: str, synthesis: dict) -> Path:
    """First `references` images of each class are references, the rest the test set."""
    out.mkdir(parents=True, exist_ok=True)
    ref_rows = np.concatenate([np.flatnonzero(labels == c)[:references] for c in range(10)])
    test_rows = np.setdiff1d(np.arange(len(labels)), ref_rows)
    np.savez(out / "refs.npz", images=images[ref_rows], labels=labels[ref_rows])
    np.savez(out / "test.npz", images=images[test_rows], labels=labels[test_rows])
    lines = [f'name = "{name}"', 'references = "refs.npz"', f'mask_rule = "threshold:{threshold}"', f"seed = {seed}",
             "", "[levels]", *(f'{o} = "{lv}"' for o, lv in levels.items())]
    if any(epsilons.values()):
        lines += ["", "[embedding_epsilon]", *(f"{o} = {e}" for o, e in epsilons.items() if e)]
    for c in range(10):
        lines += ["", "[[classes]]", f'name = "{c}"', f"prototype = {c}"]
    lines += ["", "[test]", 'images = "test.npz"']
    if synthesis:
        lines += ["", "[synthesis]", *(f"{k} = {v}" for k, v in synthesis.items())]
    (out / "task.toml").write_text("\n".join(lines) + "\n")
    return out / "task.toml"
