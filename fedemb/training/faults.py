"""Simulated faults (simulation.faults): which one hits a virtual client or a node, and what a run
should expect of them.

A virtual client's fault is drawn from the training key under (round, its slot); a node's under
(round, the first slot it trains), which names the node's share of the round whatever the node's id,
so seeded runs draw the same faults on every engine. Both are PRF draws under the node's training key:
they reveal nothing of the server's sampling, grouping or noise.

A simulated fault costs what it simulates and no more: a virtual client that raises, times out or
drops adds nothing and is counted in its node's reply (the node replies for the others); a node that
times out or drops replies at once with a marker that the server takes as arrived after the deadline.
Nothing sleeps.
"""

from __future__ import annotations

from fedemb.config import FaultConfig
from fedemb.privacy.keyed_random import keyed_uniform
from fedemb.privacy.streams import STREAM_FAULTS, STREAM_NODE_FAULTS

VIRTUAL_CLIENT_FAULTS = ("raise", "nan", "timeout", "drop")  # the order their rates are stacked in
NODE_FAULTS = ("node-timeout", "node-drop")


def _pick(names: tuple[str, ...], rates: tuple[float, ...], draw: float) -> str | None:
    edge = 0.0
    for name, rate in zip(names, rates):
        edge += rate
        if draw < edge:
            return name
    return None


def virtual_client_fault(faults: FaultConfig, training_key: int, server_round: int, slot: int) -> str | None:
    """raise, nan, timeout, drop or None for one virtual client in one round."""
    rates = (faults.raise_rate, faults.nan_rate, faults.timeout_rate, faults.drop_rate)
    if not any(rates):
        return None
    return _pick(VIRTUAL_CLIENT_FAULTS, rates,
                 float(keyed_uniform(training_key, server_round, slot, STREAM_FAULTS)))


def node_fault(faults: FaultConfig, training_key: int, server_round: int, slots: list[int]) -> str | None:
    """node-timeout, node-drop or None for the node that trains the virtual clients in `slots` this round."""
    rates = (faults.node_timeout_rate, faults.node_drop_rate)
    if not any(rates) or not slots:
        return None
    return _pick(NODE_FAULTS, rates,
                 float(keyed_uniform(training_key, server_round, min(slots), STREAM_NODE_FAULTS)))


def lost_fraction(faults: FaultConfig) -> float:
    """The expected fraction of virtual clients a per-virtual-client fault leaves out of its node's sum."""
    return faults.raise_rate + faults.nan_rate + faults.timeout_rate + faults.drop_rate


def expected_accepted_fraction(faults: FaultConfig, virtual_clients_per_node: float) -> float:
    """The fraction of a round's planned virtual clients the server should expect to accept under
    `faults`, from the configured rates and the mean number of virtual clients per node alone
    (data-independent). A NaN virtual client costs its node's whole reply, so with v virtual clients
    per node one is kept only if it is fault-free and none of the v − 1 others is NaN."""
    others = max(0.0, virtual_clients_per_node - 1.0)
    kept_by_node = 1.0 - faults.node_timeout_rate - faults.node_drop_rate
    return kept_by_node * (1.0 - lost_fraction(faults)) * (1.0 - faults.nan_rate) ** others
