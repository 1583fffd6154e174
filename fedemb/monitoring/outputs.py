"""Which round figures a run may publish, and which stay on the server.

A run's public outputs (results.json, tensorboard/, the console, report tables) carry only DP releases
recorded in the ledger (or post-processing of them) and data-independent facts. Everything else a
round measures (update norms, exact clipped fraction and loss, how many users, examples and virtual
clients took part, failures, timings) is an exact statistic of the private data: it goes to the run's
server-private folder (private/telemetry.jsonl) only. The list below is an allow-list: a figure that
is not on it is private, so a new metric can never leak by default.
"""

from __future__ import annotations

# round figure -> why it may be published
PUBLIC_ROUND_METRICS = {
    "epsilon": "the ledger's cumulative ε (data-independent)",
    "denominator": "M, fixed by the config and the population size",
    "clip-norm": "fixed: the config; adaptive: post-processing of the released noisy clipped count",
    "noise-std": "a function of the clip norm and the config",
    "effective-noise-multiplier": "a function of the clip norm and the config",
    "unclipped-fraction-estimate": "adaptive clipping's released noisy count, post-processed",
    "dp-train-loss": "the released noisy sum of bounded losses (privacy.metrics), post-processed",
    "dp-fraction-clipped": "the released noisy clipped count (privacy.metrics or adaptive clipping), post-processed",
    "model-norm": "the norm of the released model after the round: post-processing of the releases",
}


def public_round_metrics(metrics: dict) -> dict:
    """The part of a round's figures that may be published."""
    return {k: v for k, v in metrics.items() if k in PUBLIC_ROUND_METRICS}


def private_round_metrics(metrics: dict) -> dict:
    """The part that never leaves the server."""
    return {k: v for k, v in metrics.items() if k not in PUBLIC_ROUND_METRICS}
