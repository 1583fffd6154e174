"""The callback interface the strategy's round loop calls."""

from __future__ import annotations


class RoundCallback:
    def on_run_start(self, strategy, num_rounds: int) -> None:
        pass

    def on_round_end(self, server_round: int, arrays, train_metrics: dict, eval_metrics: dict | None) -> None:
        pass

    def on_run_end(self, result, strategy) -> None:
        pass
