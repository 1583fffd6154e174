"""Every metric's name, in one place: the held-out evaluation's, a round's figures, and the TensorBoard
tags they are shown under. These names are what results.json, telemetry.jsonl and TensorBoard hold:
renaming one changes the outputs (and what `fedemb report` reads back).

Which round figures may be published is decided in fedemb.monitoring.outputs, not here.
"""

from __future__ import annotations

# ---------------------------------------------------------------- held-out evaluation
# results.json "initial" / "final" / each round's "eval"; TensorBoard 2_evaluation/<name>
RECALL_AT_1 = "recall_at_1"
TAR_AT_FAR_1E_3 = "tar_at_far_1e-3"  # TAR at FAR = 1e-3
TAR_AT_FAR_1E_1 = "tar_at_far_1e-1"  # TAR at FAR = 1e-1
TAR_AT_FAR = {1e-3: TAR_AT_FAR_1E_3, 1e-1: TAR_AT_FAR_1E_1}  # FAR -> name
EVAL_METRICS = (RECALL_AT_1, TAR_AT_FAR_1E_3, TAR_AT_FAR_1E_1)
EVAL_LABELS = {RECALL_AT_1: "recall@1", TAR_AT_FAR_1E_3: "TAR@FAR=1e-3", TAR_AT_FAR_1E_1: "TAR@FAR=1e-1"}

# ---------------------------------------------------------------- a round's figures (the strategy's MetricRecord)
# releases and data-independent figures (published: fedemb.monitoring.outputs)
EPSILON = "epsilon"  # the ledger's cumulative ε after the round
DENOMINATOR = "denominator"  # M
CLIP_NORM = "clip-norm"
NOISE_STD = "noise-std"
EFFECTIVE_NOISE_MULTIPLIER = "effective-noise-multiplier"
UNCLIPPED_FRACTION_ESTIMATE = "unclipped-fraction-estimate"  # adaptive clipping
DP_TRAIN_LOSS = "dp-train-loss"  # privacy.metrics
DP_FRACTION_CLIPPED = "dp-fraction-clipped"  # privacy.metrics
MODEL_NORM = "model-norm"
# exact statistics of the private data (server-private telemetry only)
VIRTUAL_CLIENTS_PLANNED = "virtual-clients-planned"
VIRTUAL_CLIENTS_ACCEPTED = "virtual-clients-accepted"
VIRTUAL_CLIENTS_FAILED = "virtual-clients-failed"  # their training raised
VIRTUAL_CLIENTS_TIMED_OUT = "virtual-clients-timed-out"  # their node counted them late (simulation.faults)
VIRTUAL_CLIENTS_DROPPED = "virtual-clients-dropped"  # their node counted them silent (simulation.faults)
VIRTUAL_CLIENTS_REJECTED = "virtual-clients-rejected"
VIRTUAL_CLIENTS_MISSING = "virtual-clients-missing"
VIRTUAL_CLIENTS_NONFINITE = "virtual-clients-nonfinite"
REPLIES_PROJECTED = "replies-projected"
USERS = "users"
EXAMPLES = "examples"
TRAIN_LOSS = "train-loss"
DELTA_NORM_MEDIAN = "delta-norm-median"
DELTA_NORM_MAX = "delta-norm-max"
FRACTION_CLIPPED = "fraction-clipped"
DEVICES_ONLINE = "devices-online"
ROUND_SECONDS = "round-seconds"
FINISHED_AT = "finished-at"
VIRTUAL_CLIENTS_PER_SECOND = "virtual-clients-per-second"
# the counts a run's private summary.json totals over its rounds
ROUND_TOTALS = (VIRTUAL_CLIENTS_PLANNED, VIRTUAL_CLIENTS_ACCEPTED, VIRTUAL_CLIENTS_FAILED, VIRTUAL_CLIENTS_TIMED_OUT,
                VIRTUAL_CLIENTS_DROPPED, VIRTUAL_CLIENTS_REJECTED, VIRTUAL_CLIENTS_MISSING, VIRTUAL_CLIENTS_NONFINITE,
                REPLIES_PROJECTED, USERS, EXAMPLES)
# the ways a planned virtual client can end up outside the round's sum
VIRTUAL_CLIENTS_LOST = (VIRTUAL_CLIENTS_FAILED, VIRTUAL_CLIENTS_TIMED_OUT, VIRTUAL_CLIENTS_DROPPED,
                        VIRTUAL_CLIENTS_REJECTED, VIRTUAL_CLIENTS_MISSING)

# ---------------------------------------------------------------- TensorBoard
# groups, so that the ones people watch come first (TensorBoard orders them by name)
TRAINING, EVALUATION, PRIVACY, RUN = "1_training", "2_evaluation", "3_privacy", "run"
SERVER_PRIVATE = "server-private"  # the private TensorBoard's group (private/tensorboard)


def eval_tag(name: str) -> str:
    """The public TensorBoard tag of a held-out metric."""
    return f"{EVALUATION}/{name}"


def private_tag(name: str) -> str:
    """The server-private TensorBoard tag of a round figure."""
    return f"{SERVER_PRIVATE}/{name}"


TAG_DP_LOSS = f"{TRAINING}/dp_loss"
TAG_DP_FRACTION_CLIPPED = f"{TRAINING}/dp_fraction_clipped"
TAG_MODEL_NORM = f"{TRAINING}/model_norm"
TAG_EPSILON = f"{PRIVACY}/epsilon"
TAG_CLIP_NORM = f"{PRIVACY}/clip_norm"
TAG_NOISE_STD = f"{PRIVACY}/noise_std"
TAG_EFFECTIVE_NOISE_MULTIPLIER = f"{PRIVACY}/effective_noise_multiplier"
TAG_UNCLIPPED_FRACTION_ESTIMATE = f"{PRIVACY}/unclipped_fraction_estimate"
TAG_HELD_OUT_INPUTS = eval_tag("held_out_inputs_one_class_per_row")
TAG_TRAINING_INPUTS = private_tag("training_inputs_one_class_per_row")
TAG_CONFIG, TAG_PRIVACY, TAG_SUMMARY, TAG_DIVERGED = f"{RUN}/config", f"{RUN}/privacy", f"{RUN}/summary", f"{RUN}/diverged"
TAG_FAULT_INJECTION = f"{RUN}/fault_injection"
