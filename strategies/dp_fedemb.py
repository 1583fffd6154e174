"""DP-FedEmb as a Flower strategy.

Each round: sample users (Poisson, keyed), group them into virtual clients, send each node the
virtual clients it trains plus the shared model; receive per node the sum of its clipped updates and
their count; check every reply; sum; add N(0, (zC)^2); divide by the fixed number of virtual-client
slots M (never by what arrived); take a server SGD-with-momentum step; account the round.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import UserSampler
from fedemb.protocol import (LOSS_SUM, NUM_CLIPPED, NUM_EXAMPLES, NUM_NONFINITE, NUM_USERS,
                             NUM_VIRTUAL_CLIENTS, UPDATE_NORMS, TrainAssignment, train_message)
from strategies.reply_validation import check_reply
from strategies.server_optimizer import ServerOptimizer


class DPFedEmb(Strategy):
    def __init__(self, *, sampler: UserSampler, user_ids: np.ndarray, task: dict, clip_norm: float,
                 noise: GaussianNoise, server_optimizer: ServerOptimizer, privacy: PrivacyPlan,
                 eval_every: int = 1, callbacks: Iterable = ()):
        self.sampler = sampler
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        self.task = task
        self.clip_norm = clip_norm  # 0: no clipping (non-private training)
        self.noise = noise
        self.denominator = sampler.virtual_clients
        self.server_optimizer = server_optimizer
        self.privacy = privacy
        self.eval_every = eval_every
        self.callbacks = list(callbacks)
        self.shapes = {k: tuple(v.shape) for k, v in server_optimizer.state().items()}
        self.assignments: dict[int, TrainAssignment] = {}
        self.rounds_completed = 0
        self.stop_reason = ""

    # ---------------------------------------------------------------- Flower contract
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise RuntimeError("no nodes connected: cannot train")
        plan = self.sampler.plan(server_round, self.user_ids)
        per_node: dict[int, list] = defaultdict(list)
        for j, vc in enumerate(plan.virtual_clients):
            per_node[node_ids[j % len(node_ids)]].append((vc.index, vc.user_ids))
        self.assignments = {node: TrainAssignment(server_round, self.clip_norm, self.task, vcs)
                            for node, vcs in per_node.items()}
        state = arrays.to_torch_state_dict()
        return [train_message(state, a, node) for node, a in self.assignments.items()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total = {k: torch.zeros(s, dtype=torch.float32) for k, s in self.shapes.items()}
        pending = dict(self.assignments)
        stats = defaultdict(float)
        norms: list[float] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            assignment = pending.pop(node, None)
            if assignment is None:
                stats["rejected"] += 1
                log(WARNING, "round %s: reply from node %s that was not assigned (or twice): rejected",
                    server_round, node)
                continue
            checked = check_reply(reply, self.shapes, len(assignment.virtual_clients), self.clip_norm)
            if checked.rejected:
                stats["failed" if reply.has_error() else "rejected"] += len(assignment.virtual_clients)
                log(WARNING, "round %s: node %s: %s", server_round, node, checked.rejected)
                continue
            for k in total:
                total[k] += checked.update[k]
            m = checked.metrics
            stats["accepted"] += m[NUM_VIRTUAL_CLIENTS]
            stats["users"] += m[NUM_USERS]
            stats["examples"] += m[NUM_EXAMPLES]
            stats["nonfinite"] += m[NUM_NONFINITE]
            stats["clipped"] += m[NUM_CLIPPED]
            stats["loss_sum"] += m[LOSS_SUM]
            norms.extend(float(n) for n in m[UPDATE_NORMS])
        stats["missing"] = sum(len(a.virtual_clients) for a in pending.values())
        for node in pending:
            log(WARNING, "round %s: node %s did not reply in time", server_round, node)

        noisy = self.noise.add(total)
        mean_delta = {k: v / self.denominator for k, v in noisy.items()}
        new_state = self.server_optimizer.step(mean_delta)

        planned = sum(len(a.virtual_clients) for a in self.assignments.values())
        accepted = stats["accepted"]
        metrics = {
            "virtual-clients-planned": planned,
            "virtual-clients-accepted": int(accepted),
            "virtual-clients-failed": int(stats["failed"]),
            "virtual-clients-rejected": int(stats["rejected"]),
            "virtual-clients-missing": int(stats["missing"]),
            "virtual-clients-nonfinite": int(stats["nonfinite"]),
            "users": int(stats["users"]),
            "examples": int(stats["examples"]),
            "train-loss": (stats["loss_sum"] / (accepted - stats["nonfinite"])
                           if accepted > stats["nonfinite"] else float("nan")),
            "delta-norm-median": float(np.median(norms)) if norms else 0.0,
            "delta-norm-max": float(np.max(norms)) if norms else 0.0,
            "fraction-clipped": stats["clipped"] / accepted if accepted else 0.0,
            "noise-std": float(self.noise.std),
            "denominator": float(self.denominator),
        }
        return ArrayRecord(new_state), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation runs on the server, on held-out users

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "DP-FedEmb: q=%s k=%s M=%s C=%s z=%s (std %s), denominator %s",
            self.sampler.rate, self.sampler.users_per_client, self.sampler.virtual_clients, self.clip_norm,
            self.privacy.noise_multiplier, self.noise.std, self.denominator)

    # ---------------------------------------------------------------- the round loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's loop plus what DP needs: a round that would exceed the target ε is not run (and the
        run says so), every run round is accounted, and callbacks see each round's figures."""
        self.summary()
        train_config = train_config or ConfigRecord()
        result = Result()
        result.arrays = arrays = initial_arrays
        for cb in self.callbacks:
            cb.on_run_start(self, num_rounds)
        if evaluate_fn:
            result.evaluate_metrics_serverapp[0] = evaluate_fn(0, arrays)
        for server_round in range(1, num_rounds + 1):
            if not self.privacy.allows(server_round):
                self.stop_reason = (
                    f"round {server_round} not run: it would raise epsilon to "
                    f"{self.privacy.epsilon_after(server_round):.3f}, past the target "
                    f"{self.privacy.target_epsilon}")
                log(WARNING, self.stop_reason)
                break
            started = time.monotonic()
            replies = grid.send_and_receive(self.configure_train(server_round, arrays, train_config, grid),
                                            timeout=timeout)
            arrays, train_metrics = self.aggregate_train(server_round, replies)
            self.rounds_completed = server_round
            seconds = time.monotonic() - started
            train_metrics["epsilon"] = self.privacy.epsilon_after(server_round)
            train_metrics["round-seconds"] = seconds
            train_metrics["virtual-clients-per-second"] = train_metrics["virtual-clients-accepted"] / max(seconds, 1e-9)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = train_metrics
            eval_metrics = None
            due = self.eval_every and server_round % self.eval_every == 0
            if evaluate_fn and (due or server_round == num_rounds):
                eval_metrics = evaluate_fn(server_round, arrays)
                result.evaluate_metrics_serverapp[server_round] = eval_metrics
            for cb in self.callbacks:
                cb.on_round_end(server_round, arrays, dict(train_metrics),
                                dict(eval_metrics) if eval_metrics is not None else None)
        for cb in self.callbacks:
            cb.on_run_end(result, self)
        return result
