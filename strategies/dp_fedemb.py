"""DP-FedEmb as a Flower strategy.

Each round: account the round's release in the privacy ledger (on disk before anything is computed);
sample users and group them into virtual clients; send each node the virtual clients it trains plus
the shared model; receive per node the sum of its clipped updates and their count; check every reply;
sum; let the round's DP mechanism add its noise; divide by the fixed number of virtual-client slots M
(never by what arrived); take a server SGD-with-momentum step.
"""

from __future__ import annotations

import math
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

from fedemb.monitoring import metric_names as names
from fedemb.monitoring.private_log import private_log
from fedemb.privacy.clipping import global_norm
from fedemb.privacy.ledger import LedgerEntry, PrivacyLedger, release_digest
from fedemb.privacy.mechanisms import RoundCounts, RoundMechanism
from fedemb.privacy.sampling import UserSampler, indexable_ids
from fedemb.protocol import (BOUNDED_LOSS_SUM, LOSS_SUM, LOST_COUNTS, NUM_CLIPPED, NUM_DROPPED, NUM_EXAMPLES,
                             NUM_FAILED, NUM_NONFINITE, NUM_TIMED_OUT, NUM_USERS, NUM_VIRTUAL_CLIENTS, UPDATE_NORMS,
                             TrainAssignment, TrainTask, simulated_fault, train_message)
from fedemb.errors import FedembError
from strategies.device_sampling import assign_to_own_node, node_user_ids, wait_for_devices
from strategies.reply_collection import send_and_collect
from strategies.reply_validation import check_reply
from strategies.server_optimizer import ServerOptimizer
from strategies.worker_assignment import assign_balanced, assign_by_slot


FLOAT32_ROUNDING = 1e-5


class DPFedEmb(Strategy):
    def __init__(self, *, sampler: UserSampler, user_ids, task: TrainTask, mechanism: RoundMechanism,
                 server_optimizer: ServerOptimizer, ledger: PrivacyLedger, target_epsilon: float = 0.0,
                 attempt: int = 0, eval_every: int = 1, callbacks: Iterable = (),
                 placement: str = "balanced", user_examples: Callable | None = None, min_devices: int = 0,
                 wait_s: float = 300.0, progress_every_s: float = 15.0, verify_replays: bool = False):
        self.sampler = sampler
        self.user_ids = indexable_ids(user_ids)  # an array, or a procedural population's lazy UserRange
        # balanced: worker mode; by_slot: one node per virtual-client slot; devices: the users are the
        # online nodes, each training on its own data (strategies.device_sampling)
        self.placement = placement
        self.min_devices = min_devices  # devices: wait for this many before round 1
        self.wait_s = wait_s
        self.progress_every_s = progress_every_s  # how often a wait says what it waits for (private log)
        self.sent: list[Message] = []
        # examples per user, as a function of user ids (a population's examples_count: touches only the
        # cohort); None: one each
        self.user_examples = user_examples
        self.task = task
        self.loss_bound = task.loss_bound  # B of the DP training loss (privacy.metrics)
        self.mechanism = mechanism  # owns the noise and what is released of the round's counts
        self.denominator = sampler.virtual_clients  # M, fixed for the run (RunSetup.virtual_clients)
        told = getattr(mechanism, "virtual_clients", 0)
        if told and told != self.denominator:
            raise ValueError(f"the mechanism divides by M = {told} but the sampler fills M = {self.denominator} "
                             "slots: the noise would be scaled for the wrong denominator")
        self.server_optimizer = server_optimizer
        self.ledger = ledger
        self.target_epsilon = target_epsilon
        self.attempt = attempt  # > 0: a resumed run whose re-run rounds count again (fresh noise)
        self.verify_replays = verify_replays  # seeded runs: a replayed round is free only if its release is identical
        self.budget_spent = False  # stopped because the next round would pass the target ε
        self.eval_every = eval_every
        self.callbacks = list(callbacks)
        state = server_optimizer.state()
        self.shapes = {k: tuple(state[k].shape) for k in server_optimizer.update_keys}  # what replies carry
        self.assignments: dict[int, TrainAssignment] = {}
        self.last_release: dict[str, torch.Tensor] | None = None  # the round's noisy mean update
        self.last_clipped_sum: dict[str, torch.Tensor] | None = None
        self.rounds_completed = 0
        self.stop_reason = ""
        self.online = 0

    @property
    def clip_norm(self) -> float:
        return self.mechanism.clip_norm

    # ---------------------------------------------------------------- Flower contract
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise RuntimeError("no nodes connected: cannot train")
        self.online = len(node_ids)
        users = node_user_ids(node_ids) if self.placement == "devices" else self.user_ids
        plan = self.sampler.plan(server_round, users)
        if self.placement == "devices":
            per_node = assign_to_own_node(plan.virtual_clients)
        elif self.placement == "by_slot":
            per_node = assign_by_slot(plan.virtual_clients, node_ids)
        else:
            per_node = assign_balanced(plan.virtual_clients, [self._cost(vc) for vc in plan.virtual_clients], node_ids)
        self.assignments = {node: TrainAssignment(server_round, self.clip_norm, self.task,
                                                  [(vc.index, vc.user_ids) for vc in vcs])
                            for node, vcs in per_node.items()}
        state = arrays.to_torch_state_dict()
        self.sent = [train_message(state, a, node) for node, a in self.assignments.items()]
        return self.sent

    def _cost(self, vc) -> float:
        """Examples a virtual client will process: what balancing the workers is about."""
        client = self.task.client
        users = np.asarray(vc.user_ids, dtype=np.int64)
        per_user = self.user_examples(users) if self.user_examples is not None else np.ones(len(users))
        examples = int(per_user.sum()) * client.epochs
        return float(min(examples, client.max_examples))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total = {k: torch.zeros(s, dtype=torch.float32) for k, s in self.shapes.items()}
        pending = dict(self.assignments)
        position = {node: i for i, node in enumerate(sorted(self.assignments))}
        # summing in a fixed order keeps seeded runs bit-identical whatever order the replies arrive in;
        # a simulated node fault's marker stands for a reply after the deadline (send_and_collect drops it)
        replies = sorted((m for m in replies if not simulated_fault(m)),
                         key=lambda m: position.get(m.metadata.src_node_id, len(position)))
        stats = defaultdict(float)
        norms: list[float] = []
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() and node not in pending:
                # the SuperLink answers for a node it lost (e.g. NODE_UNAVAILABLE): find it by the message
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            assignment = pending.pop(node, None)
            if assignment is None:
                stats["rejected"] += 1
                private_log.warning("round %s: reply from node %s that was not assigned (or twice): rejected",
                                    server_round, node)
                continue
            checked = check_reply(reply, self.shapes, assignment, self.clip_norm)
            if checked.rejected:
                stats["failed" if reply.has_error() else "rejected"] += len(assignment.virtual_clients)
                private_log.warning("round %s: node %s: %s", server_round, node, checked.rejected)
                continue
            if checked.projected:
                stats["projected"] += 1
                # float32 sums of clipped updates overshoot by ~1e-7: routine; more is worth a warning
                level = WARNING if checked.projected > checked.bound * (1 + FLOAT32_ROUNDING) else INFO
                private_log.log(level, "round %s: node %s: update norm %.9g above %.0f x clip norm %.6g: projected "
                                "onto the ball", server_round, node, checked.projected,
                                checked.bound / self.clip_norm, self.clip_norm)
            for k in total:
                total[k] += checked.update[k]
            m = checked.metrics
            trained = m[NUM_VIRTUAL_CLIENTS] - sum(m.get(count, 0) for count in LOST_COUNTS)
            stats["accepted"] += trained
            stats["failed"] += m.get(NUM_FAILED, 0)
            stats["timed_out"] += m.get(NUM_TIMED_OUT, 0)
            stats["dropped"] += m.get(NUM_DROPPED, 0)
            stats["users"] += m[NUM_USERS]
            stats["examples"] += m[NUM_EXAMPLES]
            stats["nonfinite"] += m[NUM_NONFINITE]
            stats["clipped"] += m[NUM_CLIPPED]
            stats["loss_sum"] += m[LOSS_SUM]
            # a device's claim is clamped to what it may add
            stats["bounded_loss_sum"] += min(max(float(m.get(BOUNDED_LOSS_SUM, 0.0)), 0.0), trained * self.loss_bound)
            norms.extend(float(n) for n in m[UPDATE_NORMS])
        stats["missing"] = sum(len(a.virtual_clients) for a in pending.values())
        for node in pending:
            private_log.warning("round %s: node %s did not reply in time", server_round, node)

        self.last_clipped_sum = total  # server-side only: what the mechanism is about to noise
        accepted = stats["accepted"]
        noisy = self.mechanism.privatize(total, RoundCounts(accepted, stats["clipped"], stats["bounded_loss_sum"]))
        mean_delta = {k: v / self.denominator for k, v in noisy.items()}
        self.last_release = mean_delta
        scale = self.mechanism.step_scale
        new_state = self.server_optimizer.step(mean_delta if scale == 1.0 else
                                               {k: v * scale for k, v in mean_delta.items()})

        planned = sum(len(a.virtual_clients) for a in self.assignments.values())
        metrics = {
            names.MODEL_NORM: global_norm(new_state),  # of the released model: post-processing, published
            names.VIRTUAL_CLIENTS_PLANNED: planned,
            names.VIRTUAL_CLIENTS_ACCEPTED: int(accepted),
            names.VIRTUAL_CLIENTS_FAILED: int(stats["failed"]),
            names.VIRTUAL_CLIENTS_TIMED_OUT: int(stats["timed_out"]),
            names.VIRTUAL_CLIENTS_DROPPED: int(stats["dropped"]),
            names.VIRTUAL_CLIENTS_REJECTED: int(stats["rejected"]),
            names.VIRTUAL_CLIENTS_MISSING: int(stats["missing"]),
            names.VIRTUAL_CLIENTS_NONFINITE: int(stats["nonfinite"]),
            # server-private: over count x C by rounding, scaled back
            names.REPLIES_PROJECTED: int(stats["projected"]),
            names.USERS: int(stats["users"]),
            names.EXAMPLES: int(stats["examples"]),
            names.TRAIN_LOSS: (stats["loss_sum"] / (accepted - stats["nonfinite"])
                               if accepted > stats["nonfinite"] else float("nan")),
            names.DELTA_NORM_MEDIAN: float(np.median(norms)) if norms else 0.0,
            names.DELTA_NORM_MAX: float(np.max(norms)) if norms else 0.0,
            names.FRACTION_CLIPPED: stats["clipped"] / accepted if accepted else 0.0,
            names.DENOMINATOR: float(self.denominator),
            **({names.DEVICES_ONLINE: self.online} if self.placement == "devices" else {}),
            **self.mechanism.round_metrics(),
        }
        return ArrayRecord(new_state), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation runs on the server, on held-out users

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "DP-FedEmb: q=%s k=%s M=%s C=%s mechanism %s, denominator %s",
            self.sampler.rate, self.sampler.users_per_client, self.sampler.virtual_clients, self.clip_norm,
            self.mechanism.name, self.denominator)

    def _account_replay(self, server_round: int, entry: LedgerEntry) -> None:
        """Seeded runs: store the release's digest in its ledger entry. A resumed run replays recorded
        rounds for free only if the digest matches; a release that differs (code, data or config
        changed) is recorded as a new release under a new attempt, as are the rounds after it."""
        if not self.verify_replays or self.last_release is None:
            return
        digest = release_digest(self.last_release, self.mechanism.round_metrics())
        if self.ledger.confirm_release(entry, digest):
            return
        self.attempt = max(e.attempt for e in self.ledger.entries) + 1
        log(WARNING, "round %s: the replayed release differs from the one recorded in the ledger: "
            "it counts as a new release (attempt %s)", server_round, self.attempt)
        fresh = self.ledger.record(self.mechanism.ledger_entry(server_round, self.attempt))
        self.ledger.confirm_release(fresh, digest)

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        return {"round": self.rounds_completed, "server_optimizer": self.server_optimizer.state_dict(),
                "mechanism": self.mechanism.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rounds_completed = int(state["round"])
        self.server_optimizer.load_state_dict(state["server_optimizer"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.sampler.load_state_dict(state["sampler"])

    # ---------------------------------------------------------------- the round loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's loop plus what DP needs: each round's release is in the ledger before it is
        computed, a round that would exceed the target ε is not run (and the run says so), and
        callbacks see each round's figures. A resumed strategy continues after its last round."""
        self.summary()
        train_config = train_config or ConfigRecord()
        result = Result()
        result.arrays = arrays = initial_arrays
        for cb in self.callbacks:
            cb.on_run_start(self, num_rounds)
        if evaluate_fn and self.rounds_completed == 0:
            result.evaluate_metrics_serverapp[0] = evaluate_fn(0, arrays)
        for server_round in range(self.rounds_completed + 1, num_rounds + 1):
            if self.placement == "devices":
                try:
                    wait_for_devices(grid, self.min_devices if server_round == 1 else 1, self.wait_s,
                                     self.progress_every_s)
                except FedembError as exc:
                    # how many devices were online is a statistic of the users: the detail stays private
                    self.stop_reason = f"round {server_round} not run: too few devices online (deployment.min_devices)"
                    log(WARNING, self.stop_reason)
                    private_log.warning("round %s not run: %s", server_round, exc)
                    break
            entry = self.mechanism.ledger_entry(server_round, self.attempt)
            entry.unit = self.ledger.unit
            epsilon = self.ledger.epsilon_with(entry)
            if self.target_epsilon > 0 and epsilon > self.target_epsilon * (1 + 1e-9):
                self.stop_reason = (f"round {server_round} not run: it would raise epsilon to {epsilon:.3f}, "
                                    f"past the target {self.target_epsilon}")
                log(WARNING, self.stop_reason)
                self.budget_spent = True
                break
            entry = self.ledger.record(entry)
            started = time.monotonic()
            replies = send_and_collect(grid, list(self.configure_train(server_round, arrays, train_config, grid)),
                                       server_round=server_round, timeout_s=timeout,
                                       progress_every_s=self.progress_every_s)
            arrays, train_metrics = self.aggregate_train(server_round, replies)
            self._account_replay(server_round, entry)  # before anything of the release leaves the server
            self.rounds_completed = server_round
            model_norm = train_metrics[names.MODEL_NORM]
            seconds = time.monotonic() - started
            train_metrics[names.EPSILON] = self.ledger.epsilon
            train_metrics[names.ROUND_SECONDS] = seconds
            train_metrics[names.FINISHED_AT] = time.time()  # the run's timeline (benchmarks, monitoring)
            train_metrics[names.VIRTUAL_CLIENTS_PER_SECOND] = (train_metrics[names.VIRTUAL_CLIENTS_ACCEPTED]
                                                               / max(seconds, 1e-9))
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
            if not math.isfinite(model_norm):  # every further round would spend budget on a broken model
                self.stop_reason = f"round {server_round + 1} not run: the model is no longer finite (training diverged)"
                log(WARNING, self.stop_reason)
                break
        for cb in self.callbacks:
            cb.on_run_end(result, self)
        return result
