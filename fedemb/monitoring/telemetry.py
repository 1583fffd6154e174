"""A round's exact figures, kept on the server: private/telemetry.jsonl (one JSON line per round:
update norms, exact clipped fraction and loss, users, examples, virtual clients that failed, were
rejected, projected or missing, timings) and, only when asked for (monitoring.private_tensorboard),
a separate TensorBoard run under private/tensorboard/. Nothing here is a DP release."""

from __future__ import annotations

import json
import math
import time
from numbers import Real
from pathlib import Path

from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.metric_names import TAG_TRAINING_INPUTS, private_tag
from fedemb.run_dir import append_private_jsonl, private_dir

TELEMETRY_FILE = "telemetry.jsonl"


def read_telemetry(run_dir: Path) -> list[dict]:
    """The run's private per-round records (the last attempt of each round wins)."""
    path = Path(run_dir) / "private" / TELEMETRY_FILE
    rounds: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rounds[int(record["round"])] = record
    return [rounds[r] for r in sorted(rounds)]


class PrivateTelemetry(RoundCallback):
    def __init__(self, run_dir: Path, tensorboard: bool = False, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(private_dir(run_dir) / "tensorboard"), purge_step=purge_step)

    def log_training_inputs(self, train_population) -> None:
        """Training images are private data: a grid of them (one class per row) only in this private log."""
        if self.writer is not None:
            from fedemb.monitoring.image_grid import class_rows, sample_by_class

            images, labels = sample_by_class(train_population)
            self.writer.add_image(TAG_TRAINING_INPUTS, class_rows(images, labels), 0)

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        append_private_jsonl(self.run_dir, TELEMETRY_FILE,
                             {"round": server_round, "logged_at": time.time(), **train_metrics})
        if self.writer is not None:
            for key, value in train_metrics.items():
                if isinstance(value, Real) and math.isfinite(value):
                    self.writer.add_scalar(private_tag(key), float(value), server_round)
            self.writer.flush()

    def on_run_end(self, result, strategy):
        if self.writer is not None:
            self.writer.close()
