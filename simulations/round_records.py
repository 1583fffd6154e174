"""What a run records at the end of each round: the figures results.json publishes (History) and the
checkpoints a resumed run continues from (Checkpointer)."""

from __future__ import annotations

from pathlib import Path

from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.outputs import public_round_metrics
from fedemb.run_dir import STATE_FILE, save_checkpoint, save_state


class History(RoundCallback):
    """The per-round figures results.json publishes: releases and data-independent figures only
    (fedemb.monitoring.outputs); the exact ones are in the server-private telemetry."""

    def __init__(self, rounds: list[dict] | None = None):
        self.rounds: list[dict] = list(rounds or [])

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        self.rounds.append({"round": server_round, **public_round_metrics(train_metrics),
                            **({"eval": eval_metrics} if eval_metrics else {})})


class Checkpointer(RoundCallback):
    """Every n rounds: the model (checkpoints/round-NNNNN.pt) and what a resumed run needs
    (checkpoints/state.pt: server optimizer, mechanism, sampler, server secret, history). state.pt is
    server-private: it holds the sampling key (and for DP-FTRL the tree's noise); publish models only.
    Must come after History among the callbacks, so the state holds the round's figures."""

    def __init__(self, run_dir: Path, every: int, history: History, run_facts: dict, keep_private_state: bool = True):
        self.run_dir, self.every, self.history, self.run_facts = run_dir, every, history, run_facts
        self.keep_private_state = keep_private_state
        self.strategy = None
        self.rounds = 0

    def on_run_start(self, strategy, num_rounds):
        self.strategy, self.rounds = strategy, num_rounds

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        if self.every and server_round % self.every == 0:
            save_checkpoint(self.run_dir / "checkpoints" / f"round-{server_round:05d}.pt", arrays.to_torch_state_dict())
            save_state(self.run_dir / STATE_FILE, self.run_state())
        elif server_round == self.rounds:  # training is over: a crash in what follows resumes without retraining
            save_state(self.run_dir / STATE_FILE, self.run_state())

    def run_state(self) -> dict:
        return {"version": 1, "strategy": self.strategy.state_dict(), "history": self.history.rounds, **self.run_facts}

    def settle(self, strategy) -> None:
        """Once a run's results and final model are written: a finished run (all its rounds, or its ε
        budget spent) keeps its complete last state only with run.keep_private_state (so it can be
        extended). Otherwise state.pt becomes a stub that says the run finished: the secret key, the
        tree's noise and the noise generator are deleted, and --resume says so. A run stopped early for
        another reason (too few devices) keeps its state."""
        if not (strategy.rounds_completed >= self.rounds or strategy.budget_spent):
            return
        if self.keep_private_state:
            if self.every:
                save_state(self.run_dir / STATE_FILE, self.run_state())
            return
        save_state(self.run_dir / STATE_FILE, {"version": 1, "finished": True, "private_state_removed": True,
                                               "strategy": {"round": strategy.rounds_completed}})
