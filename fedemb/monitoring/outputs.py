"""Which round figures a run may publish, and which stay on the server.

A run's public outputs (results.json, tensorboard/, the console, report tables) carry only DP releases
recorded in the ledger (or post-processing of them) and data-independent facts. Everything else a
round measures (update norms, exact clipped fraction and loss, how many users, examples and virtual
clients took part, failures, timings) is an exact statistic of the private data: it goes to the run's
server-private folder (private/telemetry.jsonl) only. The list below is an allow-list: a figure that
is not on it is private, so a new metric can never leak by default.
"""

from __future__ import annotations

from fedemb.monitoring import metric_names as names

# round figure -> why it may be published
PUBLIC_ROUND_METRICS = {
    names.EPSILON: "the ledger's cumulative ε (data-independent)",
    names.DENOMINATOR: "M, fixed by the config and the population size",
    names.CLIP_NORM: "fixed: the config; adaptive: post-processing of the released noisy clipped count",
    names.NOISE_STD: "a function of the clip norm and the config",
    names.EFFECTIVE_NOISE_MULTIPLIER: "a function of the clip norm and the config",
    names.UNCLIPPED_FRACTION_ESTIMATE: "adaptive clipping's released noisy count, post-processed",
    names.DP_TRAIN_LOSS: "the released noisy sum of bounded losses (privacy.metrics), post-processed",
    names.DP_FRACTION_CLIPPED: "the released noisy clipped count (privacy.metrics or adaptive clipping), post-processed",
    names.MODEL_NORM: "the norm of the released model after the round: post-processing of the releases",
}


def public_round_metrics(metrics: dict) -> dict:
    """The part of a round's figures that may be published."""
    return {k: v for k, v in metrics.items() if k in PUBLIC_ROUND_METRICS}


def private_round_metrics(metrics: dict) -> dict:
    """The part that never leaves the server."""
    return {k: v for k, v in metrics.items() if k not in PUBLIC_ROUND_METRICS}
