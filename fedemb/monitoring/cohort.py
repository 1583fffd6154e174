"""Rounds that lose most of their cohort say so, publicly only in words the configuration decides.

How many of a round's virtual clients were accepted is an exact statistic of the users (an exact
participant count tells neighbouring populations apart), and no run releases it with noise. So:
- the public side (the console, results.json's `fault_injection`, TensorBoard's run/fault_injection
  text) says what the configuration implies, before round 1: the injected fault rates and the
  fraction of each round's virtual clients to expect accepted under them
  (fedemb.training.faults.expected_accepted_fraction), and whether that is less than half;
- the server-private side (private/events.log, echoed marked with monitoring.private_console, and
  private/summary.json) names every round that accepted less than half of its planned virtual clients,
  with its exact counts by way of loss.
"""

from __future__ import annotations

from fedemb.config import FaultConfig
from fedemb.monitoring import metric_names as names
from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.private_log import private_log
from fedemb.training.faults import expected_accepted_fraction, lost_fraction

MOST = 0.5  # a round that accepts less than this fraction of its planned virtual clients lost most of them


def cohort_loss(metrics: dict) -> dict | None:
    """A round's exact loss {planned, accepted, <way of loss>: count} when it lost most of its planned
    virtual clients, else None. Server-private."""
    planned = int(metrics.get(names.VIRTUAL_CLIENTS_PLANNED, 0))
    accepted = int(metrics.get(names.VIRTUAL_CLIENTS_ACCEPTED, 0))
    if not planned or accepted >= MOST * planned:
        return None
    return {"planned": planned, "accepted": accepted,
            **{key: int(metrics.get(key, 0)) for key in names.VIRTUAL_CLIENTS_LOST if metrics.get(key, 0)}}


def lossy_rounds(telemetry: list[dict]) -> list[dict]:
    """The rounds of a run's private telemetry that lost most of their cohort, with their exact counts."""
    return [{"round": int(record["round"]), **loss} for record in telemetry if (loss := cohort_loss(record))]


class CohortWatch(RoundCallback):
    """Writes each round that lost most of its cohort to the server-private event log."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        loss = cohort_loss(train_metrics)
        if loss is None:
            return
        self.rounds.append(server_round)
        ways = ", ".join(f"{count} {key.removeprefix('virtual-clients-')}" for key, count in loss.items()
                         if key not in ("planned", "accepted"))
        private_log.warning("round %s lost most of its cohort: %d of %d planned virtual clients accepted (%s); "
                            "they add nothing, the denominator and the noise stay", server_round, loss["accepted"],
                            loss["planned"], ways)

    def on_run_end(self, result, strategy):
        if self.rounds:
            private_log.warning("%d rounds lost most of their cohort: %s (private/summary.json)", len(self.rounds),
                                " ".join(str(r) for r in self.rounds))


def fault_injection_notice(faults: FaultConfig, virtual_clients_per_node: float) -> dict | None:
    """What a run injecting `faults` publishes about them: the configured rates and what to expect of
    them, all data-independent (the config, M and the number of nodes). None without faults."""
    node_rate = faults.node_timeout_rate + faults.node_drop_rate
    client_rate = lost_fraction(faults)
    if not client_rate and not node_rate:
        return None
    expected = expected_accepted_fraction(faults, virtual_clients_per_node)
    most = expected < MOST
    injected = [f"about {client_rate:.0%} of the virtual clients"] if client_rate else []
    injected += [f"about {node_rate:.0%} of the nodes' replies"] if node_rate else []
    warning = "most of each round's cohort will be lost: " if most else ""
    notice = (f"{warning}simulation.faults injects faults into "
              f"{' and '.join(injected)}: expect about {expected:.0%} of each round's planned virtual clients "
              "accepted. The others add nothing; the denominator M, the noise and ε stay as they are, so "
              "the model learns from less signal. Exact counts per round are server-private (private/).")
    return {"virtual_client_fault_rate": round(client_rate, 6), "node_fault_rate": round(node_rate, 6),
            "expected_accepted_fraction": round(expected, 4), "loses_most_of_each_round": most, "notice": notice}
