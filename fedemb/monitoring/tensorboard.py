"""The run's published TensorBoard log (RUN/tensorboard).

What it shows, all of it DP releases or data-independent (fedemb.monitoring.outputs): the round curves,
grouped so that the ones people watch come first (1_training, 2_evaluation, 3_privacy); figures that
never change in a run (δ, the unit, the clip norm and noise of fixed clipping) once as text, not as flat
curves; the config and, at the end, a summary as text; an HParams entry (the config against the held-out
metrics and ε); a grid of held-out users' inputs as the model sees them; and the held-out embeddings in
the projector, with class and user, at every evaluation. Training images are private data: they go
only to the server-private log (fedemb.monitoring.telemetry).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from fedemb.monitoring import metric_names as names
from fedemb.monitoring.callback import RoundCallback

ROUND_CURVES = {  # tag -> round figure
    names.TAG_DP_LOSS: names.DP_TRAIN_LOSS,
    names.TAG_DP_FRACTION_CLIPPED: names.DP_FRACTION_CLIPPED,
    names.TAG_MODEL_NORM: names.MODEL_NORM,
    names.TAG_EPSILON: names.EPSILON,
}
# constant under fixed clipping (then they are text); curves only when adaptive clipping moves them
ADAPTIVE_CURVES = {
    names.TAG_CLIP_NORM: names.CLIP_NORM,
    names.TAG_NOISE_STD: names.NOISE_STD,
    names.TAG_EFFECTIVE_NOISE_MULTIPLIER: names.EFFECTIVE_NOISE_MULTIPLIER,
    names.TAG_UNCLIPPED_FRACTION_ESTIMATE: names.UNCLIPPED_FRACTION_ESTIMATE,
}
HPARAM_METRICS = (*(names.eval_tag(m) for m in names.EVAL_METRICS), names.TAG_EPSILON)
PROJECTOR_TAG = "held_out_users"
PROJECTOR_CONFIG = "projector_config.pbtxt"

# (embeddings, class labels, user ids, images in [0, 1]) of the latest evaluation, or None
ProjectorSource = Callable[[], "tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor] | None"]


def round_curves(adaptive_clipping: bool) -> dict[str, str]:
    return {**ROUND_CURVES, **(ADAPTIVE_CURVES if adaptive_clipping else {})}


# always in the HParams entry; with every other key whose value is not the built-in default. TensorBoard
# lists them alphabetically and shows the first five until others are ticked.
HPARAM_KEYS = ("client.lr", "data.name", "model.name", "privacy.clip_norm (C)", "privacy.clipping", "privacy.delta",
               "privacy.noise_multiplier (z)", "privacy.target_epsilon", "privacy.unit", "run.rounds",
               "sampling.rate", "sampling.users_per_client", "server.lr")


def hparams_entry(config: dict, defaults: dict, constants: dict) -> dict[str, float | int | str | bool]:
    """What a run's HParams row compares: the keys above and whatever this config changed."""
    values, default_values = hparam_values({**config, **constants}), hparam_values(defaults)
    return {k: v for k, v in values.items() if k in HPARAM_KEYS or (k in default_values and v != default_values[k])}


def hparam_values(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """The config flattened to section.key, in the types the HParams plugin takes."""
    flat: dict[str, float | int | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hparam_values(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def markdown_table(rows: dict[str, object]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())


def code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown: indented = verbatim


class TensorBoardLogger(RoundCallback):
    def __init__(self, log_dir: Path, purge_step: int | None = None, curves: dict[str, str] | None = None,
                 projector: ProjectorSource | None = None):
        self.log_dir = Path(log_dir)
        # a resumed run hides what the crashed attempt logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.curves = ROUND_CURVES if curves is None else curves
        self.projector = projector
        self.projected: set[int] = set()
        self.warnings: list[str] = []
        self.kept_projections = _drop_projections_from(self.log_dir, purge_step) if purge_step else []

    def log_run_start(self, config_toml: str, hparams: dict, facts: dict[str, object],
                      inputs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Once, at step 0: the config, the run's constants, the HParams entry and the inputs grid."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        from fedemb.monitoring.image_grid import class_rows

        self.writer.add_text(names.TAG_CONFIG, code_block(config_toml), 0)
        self.writer.add_text(names.TAG_PRIVACY, markdown_table(facts), 0)
        for summary in hparams_summaries(hparams, {tag: 0.0 for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)
        if inputs is not None:
            images, labels = inputs
            self.writer.add_image(names.TAG_HELD_OUT_INPUTS, class_rows(images, labels), 0)
        self.writer.flush()

    def log_eval(self, step: int, eval_metrics: dict) -> None:
        for key, value in eval_metrics.items():
            self.writer.add_scalar(names.eval_tag(key), float(value), step)
        self.project(step)

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        for tag, key in self.curves.items():
            value = train_metrics.get(key)
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(tag, float(value), server_round)
        if eval_metrics:
            self.log_eval(server_round, eval_metrics)
        self.writer.flush()

    def log_summary(self, summary: dict[str, object], step: int) -> None:
        self.writer.add_text(names.TAG_SUMMARY, markdown_table(summary), step)
        self.writer.flush()

    def project(self, step: int) -> None:
        """The latest evaluation's embeddings in the projector; a failure is a warning, and no more are tried."""
        if self.projector is None or step in self.projected:
            return
        try:
            source = self.projector()
            if source is None:
                return
            embeddings, labels, users, images = source
            self.writer.add_embedding(torch.from_numpy(embeddings), label_img=images, global_step=step,
                                      metadata=[[str(int(c)), str(int(u))] for c, u in zip(labels, users)],
                                      metadata_header=["class", "user"], tag=PROJECTOR_TAG)
            _write_projector_config(self.log_dir, self.kept_projections)
            self.projected.add(step)
        except Exception as exc:  # noqa: BLE001 - an optional output never costs the run
            self.projector = None
            self.warnings.append(f"the TensorBoard projector was not written ({type(exc).__name__}: {exc}); "
                                 "the run's results are complete")

    def close(self) -> None:
        self.writer.close()


def _projection_step(embedding) -> int:
    return int(Path(embedding.tensor_path).parts[0])  # torch writes each step's files under NNNNN/


def _projection_name(step: int, latest: bool) -> str:
    """The projector opens the alphabetically first name: "(latest" sorts before "(round"."""
    return f"{PROJECTOR_TAG} (latest: round {step})" if latest else f"{PROJECTOR_TAG} (round {step})"


def _read_projector_config(log_dir: Path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    path = log_dir / PROJECTOR_CONFIG
    if path.is_file():
        text_format.Parse(path.read_text(), config)
    return config


def _drop_projections_from(log_dir: Path, step: int) -> list:
    """A resumed run: the crashed attempt's projections from `step` on go; the earlier ones are kept."""
    kept = []
    for embedding in _read_projector_config(log_dir).embeddings:
        if _projection_step(embedding) < step:
            kept.append(embedding)
        else:
            shutil.rmtree(log_dir / Path(embedding.tensor_path).parent, ignore_errors=True)
    return kept


def _write_projector_config(log_dir: Path, kept: list) -> None:
    """torch's writer lists only its own session's projections; a resumed run's earlier ones are added back."""
    from google.protobuf import text_format

    config = _read_projector_config(log_dir)
    by_step = {_projection_step(e): e for e in [*kept, *config.embeddings]}
    del config.embeddings[:]
    for step in sorted(by_step):
        by_step[step].tensor_name = _projection_name(step, latest=step == max(by_step))
        config.embeddings.append(by_step[step])
    (log_dir / PROJECTOR_CONFIG).write_text(text_format.MessageToString(config))
