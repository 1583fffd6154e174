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
        writer.add_embedding(mat, metadata=meta, metadata_header=["label", "source"], tag="real_vs_synthetic")


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 16):
    """One row per class, up to per_class images each: a (C, H, W) tensor in [0, 1]."""
    import torch
    from torchvision.utils import make_grid

    rows = []
    for c in np.unique(labels):
        picked = images[labels == c][:per_class]
        pad = np.zeros((per_class - len(picked), *images.shape[1:]), dtype=images.dtype)
        rows.append(np.concatenate([picked, pad]))
    return make_grid(torch.as_tensor(np.concatenate(rows)), nrow=per_class, padding=1, pad_value=0.5)


def save_image_grids(grids: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """Each named (images, labels) set as out/NAME.png and as an image in out/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import save_image

    with SummaryWriter(str(out / "tensorboard")) as writer:
        for name, (images, labels) in grids.items():
            grid = image_grid(images, labels)
            save_image(grid, out / f"{name}.png")
            writer.add_image(name, grid, 0)
