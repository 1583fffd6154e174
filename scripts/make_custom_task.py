"""Write a customized-synthesis task (task.toml, refs.npz, test.npz) for one real user.

MNIST: the user is one NIST writer of MNIST t10k (QMNIST extended labels; these writers are disjoint
from the 539 training writers), with `--references` images per class as references and the rest of
the writer's images as the held-out test set. Digits (the embedded default, no writers): a random set
of images stands in for the user.

    .venv/bin/python scripts/make_custom_task.py --dataset mnist --mnist data/mnist \\
        --test-writers PATH/qmnist-test-labels-idx2-int.gz --writer-rank 0 --foreground L1 --out runs/task-w0
    .venv/bin/fedemb synth custom runs/mnist --task runs/task-w0/task.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedemb.data.idx import find_idx, read_idx, read_qmnist_writers  # noqa: E402


def writer_images(mnist: Path, test_writers: Path, rank: int, min_per_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The images and labels of the writer with the rank-th most t10k images among those holding at
    least `min_per_class` of every digit."""
    images = read_idx(find_idx(mnist, "t10k", "images"))
    labels = read_idx(find_idx(mnist, "t10k", "labels")).astype(np.int64)
    writers, _ = read_qmnist_writers(test_writers, len(labels))
    eligible = [w for w in np.unique(writers)
                if np.bincount(labels[writers == w], minlength=10).min() >= min_per_class]
    if rank >= len(eligible):
        raise SystemExit(f"only {len(eligible)} writers hold {min_per_class}+ images of every digit")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("mnist", "digits"), default="mnist")
    ap.add_argument("--mnist", type=Path, default=Path("data/mnist"))
    ap.add_argument("--test-writers", type=Path, help="QMNIST qmnist-test-labels-idx2-int.gz (MNIST only)")
    ap.add_argument("--writer-rank", type=int, default=0)
    ap.add_argument("--references", type=int, default=1, help="reference images per class")
    ap.add_argument("--foreground", default="L1")
    ap.add_argument("--background", default="L0")
    ap.add_argument("--foreground-epsilon", type=float, default=0.0)
    ap.add_argument("--threshold", type=float, default=0.3, help="foreground = intensity above this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.dataset == "mnist":
        if args.test_writers is None:
            raise SystemExit("--test-writers is required for MNIST")
        images, labels, writer = writer_images(args.mnist, args.test_writers, args.writer_rank, args.references + 1)
        name = f"writer-{writer}"
    else:
        images, labels, writer = digits_images(args.seed, args.references + 8)
        name = "digits-sample"
    task = write_task(args.out, images, labels, args.references, {"foreground": args.foreground,
                                                                   "background": args.background},
                      {"foreground": args.foreground_epsilon}, args.threshold, args.seed, name, {})
    print(task)


if __name__ == "__main__":
    main()
