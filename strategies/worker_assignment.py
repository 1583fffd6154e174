"""Which node trains which virtual client.

Worker mode (simulation default): a few long-lived nodes each train many virtual clients per round;
the virtual clients are spread so that every worker gets about the same amount of training (greedy
longest-first onto the least-loaded worker, by examples to process). Device mode: one node per
virtual-client slot, as on real devices. Either way a node's reply is the sum of its clipped updates,
so the DP aggregate is the same; only who computes which part changes.
"""

from __future__ import annotations

import heapq

from fedemb.privacy.sampling import VirtualClient


def assign_balanced(virtual_clients: list[VirtualClient], costs: list[float], node_ids: list[int]
                    ) -> dict[int, list[VirtualClient]]:
    load = [(0.0, i) for i in range(len(node_ids))]
    heapq.heapify(load)
    out: dict[int, list[VirtualClient]] = {}
    for j in sorted(range(len(virtual_clients)), key=lambda j: (-costs[j], virtual_clients[j].index)):
        total, i = heapq.heappop(load)
        out.setdefault(node_ids[i], []).append(virtual_clients[j])
        heapq.heappush(load, (total + costs[j], i))
    for vcs in out.values():  # a node trains its virtual clients in slot order (a fixed summation order)
        vcs.sort(key=lambda vc: vc.index)
    return out


def assign_by_slot(virtual_clients: list[VirtualClient], node_ids: list[int]) -> dict[int, list[VirtualClient]]:
    out: dict[int, list[VirtualClient]] = {}
    for vc in virtual_clients:
        out.setdefault(node_ids[vc.index % len(node_ids)], []).append(vc)
    return out
