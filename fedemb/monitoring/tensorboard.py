"""TensorBoard event files in the run directory: per-round privacy figures, DP training metrics and
evaluation scalars, and the final evaluation embeddings in the projector with image sprites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from fedemb.monitoring.callback import RoundCallback

# what the published tensorboard/ shows: releases and data-independent figures only
# (fedemb.monitoring.outputs); exact round statistics go to the server-private telemetry
PUBLIC_SCALARS = {
    "train/dp_loss": "dp-train-loss",
    "train/dp_fraction_clipped": "dp-fraction-clipped",
    "train/model_norm": "model-norm",
    "privacy/noise_std": "noise-std",
    "privacy/clip_norm": "clip-norm",
    "privacy/effective_noise_multiplier": "effective-noise-multiplier",
    "privacy/unclipped_fraction_estimate": "unclipped-fraction-estimate",
    "privacy/epsilon": "epsilon",
}


class TensorBoardLogger(RoundCallback):
    def __init__(self, log_dir: Path, purge_step: int | None = None, scalars: dict[str, str] | None = None):
        # a resumed run hides what the crashed attempt logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.scalars = PUBLIC_SCALARS if scalars is None else scalars

    def log_eval(self, step: int, eval_metrics: dict) -> None:
        for key, value in eval_metrics.items():
            self.writer.add_scalar(f"eval/{key}", float(value), step)

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        for tag, key in self.scalars.items():
            value = train_metrics.get(key)
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(tag, float(value), server_round)
        if eval_metrics:
            self.log_eval(server_round, eval_metrics)
        self.writer.flush()

    def add_projector(self, embeddings: np.ndarray, labels: np.ndarray, images: torch.Tensor, step: int) -> None:
        self.writer.add_embedding(torch.from_numpy(embeddings), metadata=[int(y) for y in labels],
                                  label_img=images, global_step=step, tag="eval_embeddings")

    def close(self) -> None:
        self.writer.close()
