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
from pathlib import Path

from fedemb.errors import FedembError
from fedemb.synth.task_writer import digits_images, write_task, writer_images


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
    if args.dataset == "mnist" and args.test_writers is None:
        raise SystemExit("--test-writers is required for MNIST")
    try:
        if args.dataset == "mnist":
            images, labels, writer = writer_images(args.mnist, args.test_writers, args.writer_rank,
                                                   args.references + 1)
            name = f"writer-{writer}"
        else:
            images, labels, writer = digits_images(args.seed, args.references + 8)
            name = "digits-sample"
        task = write_task(args.out, images, labels, args.references, {"foreground": args.foreground,
                                                                       "background": args.background},
                          {"foreground": args.foreground_epsilon}, args.threshold, args.seed, name, {})
    except FedembError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(task)


if __name__ == "__main__":
    main()
