"""Write a customized-synthesis task (task.toml, refs.npz, test.npz) from one user's images.

The users: a NIST writer of MNIST t10k (QMNIST extended labels; disjoint from the training writers), or
a random set of scikit-learn digits standing in for one. fedemb.synth.task_spec reads what this writes;
`fedemb synth task` is its command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tomli_w

from fedemb.data.idx import find_idx, read_idx, read_qmnist_writers
from fedemb.errors import DataError
from fedemb.synth.task_spec import TaskSpec
from fedemb.typed_config import parse


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
    """First `references` images of each class are references, the rest the test set. The task is checked
    (fedemb.synth.task_spec) before anything is written."""
    classes = [int(c) for c in np.unique(labels)]
    task = {"name": name, "references": "refs.npz", "mask_rule": f"threshold:{threshold}", "seed": seed,
            "levels": levels, "embedding_epsilon": {o: float(e) for o, e in epsilons.items() if e},
            "classes": [{"name": str(c), "prototype": c} for c in classes], "test": {"images": "test.npz"},
            "synthesis": synthesis}
    parse(TaskSpec, task, f"task {name!r}")
    out.mkdir(parents=True, exist_ok=True)
    ref_rows = np.concatenate([np.flatnonzero(labels == c)[:references] for c in classes])
    test_rows = np.setdiff1d(np.arange(len(labels)), ref_rows)
    np.savez(out / "refs.npz", images=images[ref_rows], labels=labels[ref_rows])
    np.savez(out / "test.npz", images=images[test_rows], labels=labels[test_rows])
    (out / "task.toml").write_text(tomli_w.dumps({k: v for k, v in task.items() if v != {}}))
    return out / "task.toml"


def write_user_task(out: Path, dataset: str, user: int, references: int, levels: dict[str, str],
                    epsilons: dict[str, float], threshold: float = 0.3, seed: int = -1, synthesis: dict | None = None,
                    mnist: Path = Path("data/mnist"), test_writers: Path | None = None) -> Path:
    """The task of one user: for "mnist" the NIST writer of t10k with the `user`-th most images (0: the
    most) among those holding `references` + 1 of every digit; for "digits" the `user`-th random sample of
    `references` + 8 images per class standing in for one."""
    if dataset == "mnist":
        if test_writers is None:
            raise DataError("MNIST writers need QMNIST's qmnist-test-labels-idx2-int.gz (--test-writers)")
        images, labels, writer = writer_images(mnist, test_writers, user, references + 1)
        name = f"writer-{writer}"
    elif dataset == "digits":
        images, labels, _ = digits_images(user, references + 8)
        name = f"digits-sample-{user}"
    else:
        raise DataError(f"dataset must be mnist or digits, got {dataset!r}")
    return write_task(out, images, labels, references, levels, epsilons, threshold, seed, name, synthesis or {})
