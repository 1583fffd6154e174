"""Training that blows up says so: the round it started, in the console, results.json and TensorBoard.

It watches only what a run may publish: the norm of the released model after each round (post-processing
of the DP releases), so the verdict itself is publishable. A model that is no longer finite stops the run
(in the strategy: every further round would spend budget on nothing); a model whose norm has grown by
GROWTH_FACTOR over the initial one is reported and the run goes on.
"""

from __future__ import annotations

import math
from logging import WARNING

from flwr.common.logger import log

from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.metric_names import MODEL_NORM, TAG_DIVERGED

GROWTH_FACTOR = 100.0
ADVICE = ("lower server.lr (or server.momentum) and client.lr; with DP, a smaller privacy.clip_norm "
          "or more users per round lowers the noise per step (docs/divergence.md)")


class DivergenceWatch(RoundCallback):
    def __init__(self, initial_norm: float, tensorboard_writer=None, run_state: dict | None = None,
                 growth_factor: float = GROWTH_FACTOR):
        """run_state: the dict a checkpoint saves; the report is kept in it under "diverged", so a resumed
        run still reports the round its training diverged in."""
        self.initial_norm = max(float(initial_norm), 1e-12)
        self.writer = tensorboard_writer
        self.growth_factor = growth_factor
        self.run_state = run_state if run_state is not None else {}
        self.run_state.setdefault("diverged", None)

    @property
    def report(self) -> dict | None:
        """{"round", "reason", "advice"} once diverged, else None."""
        return self.run_state["diverged"]

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        if self.report is not None:
            return
        norm = float(train_metrics.get(MODEL_NORM, 0.0))
        if not math.isfinite(norm):
            reason = "the model is no longer finite"
        elif norm > self.growth_factor * self.initial_norm:
            reason = (f"the model's norm grew to {norm:.3g}, {norm / self.initial_norm:.3g} times its initial "
                      f"{self.initial_norm:.3g}")
        else:
            return
        self.run_state["diverged"] = {"round": server_round, "reason": reason, "advice": ADVICE}
        log(WARNING, "training diverged in round %s: %s; %s", server_round, reason, ADVICE)
        if self.writer is not None:
            self.writer.add_text(TAG_DIVERGED, f"round {server_round}: {reason}. What to change: {ADVICE}",
                                 server_round)
            self.writer.flush()
