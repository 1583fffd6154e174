"""On real devices the users are the SuperNodes: each holds one user's data and trains itself.

Each round the server draws the round's devices among those online with the run's sampler, keyed by
(server secret, round) and never shown to anyone: with Poisson sampling every device takes part with
probability q, independently of every other device and of all data (a Binomial count, then a uniform
subset of the online nodes: the same distribution; fedemb.privacy.sampling). A device that is
offline, or drops out after being drawn, takes part with a lower probability, which never weakens the
guarantee, so the accountant's q is what the deployment delivers. The denominator stays
round(q x registered devices) whatever turns up. With node authentication a node id is a registered
key, so one device cannot join as several; the privacy unit is that key (docs/deployment.md).

What a device receives depends on nobody else's participation: the model, the round number, the clip
norm, the run's static task (with a training key that is a PRF output, revealing nothing of the
server's secret) and the virtual client made of itself, indexed by its own id. The sampler's index
of a virtual client (with k = 1 its rank among the round's sampled users) would tell it how many
devices with smaller ids were drawn, so it never leaves the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.serverapp import Grid

from fedemb.errors import FedembError
from fedemb.monitoring.private_log import private_log
from fedemb.privacy.sampling import VirtualClient
from strategies.reply_collection import WAITING, utc_clock_after


def node_user_ids(node_ids: Iterable[int]) -> np.ndarray:
    """Flower node ids are unsigned 64-bit; the sampler keys on their bits as int64."""
    return np.asarray(sorted(int(n) for n in node_ids), dtype=np.uint64).view(np.int64)


def assign_to_own_node(virtual_clients: list[VirtualClient]) -> dict[int, list[VirtualClient]]:
    """Each sampled device trains the virtual client made of itself (k = 1), indexed by its own id."""
    out: dict[int, list[VirtualClient]] = {}
    for vc in virtual_clients:
        if len(vc.user_ids) != 1:
            raise ValueError("on devices every virtual client is one device (users_per_client = 1)")
        (user,) = vc.user_ids
        node = int(np.asarray(user, dtype=np.int64).view(np.uint64))
        out[node] = [VirtualClient(int(user), (int(user),))]
    return out


def wait_for_devices(grid: Grid, minimum: int, timeout_s: float, progress_every_s: float = 15.0,
                     poll_s: float = 2.0) -> int:
    """Block until `minimum` devices are online; a FedembError naming the shortfall after `timeout_s`.
    Every `progress_every_s` seconds of waiting, one private line with the nodes online and the deadline
    (which devices are online is not published)."""
    started = time.monotonic()
    deadline = started + timeout_s
    deadline_utc = utc_clock_after(timeout_s)
    next_report = started
    online = sorted(grid.get_node_ids())
    while len(online) < minimum:
        now = time.monotonic()
        if now >= deadline:
            raise FedembError(f"only {len(online)} of the {minimum} devices needed (deployment.min_devices) were "
                              f"online after {timeout_s:.0f} s (deployment.wait_s)")
        if now >= next_report:
            private_log.info("%s devices: %d of %d online until %s UTC (deployment.wait_s = %g s): nodes %s",
                             WAITING, len(online), minimum, deadline_utc, timeout_s,
                             " ".join(str(n) for n in online) or "none")
            next_report = now + progress_every_s
        time.sleep(max(0.0, min(poll_s, deadline - now)))
        online = sorted(grid.get_node_ids())
    private_log.info("%s devices online: nodes %s", len(online), " ".join(str(n) for n in online))
    return len(online)
