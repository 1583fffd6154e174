"""Pictures of a synthesis run: accuracy against ε (PNG) and real vs synthetic in TensorBoard's projector."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedemb.synth.embedded import Embedded

LABELS = {"gmm_mlp": "MLP on DP-GMM samples", "dpsgd_linear_probe": "DP-SGD linear probe (Opacus)",
          "dp_prototypes": "DP class prototypes"}


def accuracy_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sweep = results["sweep"]
    eps = [p["epsilon"] for p in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in LABELS.items():  # DP releases only: the non-private MLP is server-private
        if method in sweep[0]:
            ax.plot(eps, [p[method]["accuracy"] for p in sweep], marker="o", label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel(f"synthesis ε ({results['unit']}-level, δ = {results['delta']:.2g})")
    ax.set_ylabel("accuracy on held-out users' real embeddings")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def projector(test: Embedded, x_syn: np.ndarray, y_syn: np.ndarray, logdir: Path, rng: np.random.Generator,
              per_source: int = 1000) -> None:
    """Held-out users' embeddings (never the private ones) beside synthetic ones, labelled by source."""
    from torch.utils.tensorboard import SummaryWriter

    real = rng.choice(len(test), size=min(per_source, len(test)), replace=False)
    syn = rng.choice(len(x_syn), size=min(per_source, len(x_syn)), replace=False)
    mat = np.concatenate([test.x[real], x_syn[syn]])
    meta = [[str(int(label)), "real (held-out users)"] for label in test.labels[real]]
    meta += [[str(int(label)), "synthetic"] for label in y_syn[syn]]
    with SummaryWriter(str(logdir)) as writer:
        writer.add_embedding(mat, metadata=meta, metadata_header=["class", "source"], tag="real_vs_synthetic")


def log_dir(out: Path, kind: str) -> Path:
    """A synthesis command's TensorBoard run: named by its kind and apart from the training run's events,
    so `tensorboard --logdir RUN` lists training and each synthesis separately."""
    return out / "tensorboard" / f"synthesis-{kind}"


def save_image_grids(grids: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, kind: str,
                     summary: dict[str, object]) -> None:
    """Each named (images, labels) set as out/NAME.png (one class per row) and in the synthesis run's
    TensorBoard images, with the release's summary as text."""
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import save_image

    from fedemb.monitoring.image_grid import class_rows
    from fedemb.monitoring.tensorboard import markdown_table

    with SummaryWriter(str(log_dir(out, kind))) as writer:
        writer.add_text(f"synthesis-{kind}/summary", markdown_table(summary), 0)
        for name, (images, labels) in grids.items():
            grid = class_rows(images, labels)
            save_image(grid, out / f"{name}.png")
            writer.add_image(f"synthesis-{kind}/{name}_one_class_per_row", grid, 0)
