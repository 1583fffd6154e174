"""Send a round's train messages and collect the replies until all are in or the round's deadline,
saying while it waits which nodes it still waits for and until when.

Which nodes were sent work is the round's secret sample, so the progress lines go to the server's
private event log (monitoring.private_console echoes them, marked); `fedemb deploy run`
shows them to the operator with the registered names.

A reply that stands for a simulated node fault (fedemb.protocol.simulated_fault) is taken as arrived
after the deadline: it is discarded when it comes, at once, so its node counts as missing exactly as a
real late one would, without the wait, and nothing of it is left for a later round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone

from flwr.app import Message
from flwr.serverapp import Grid

from fedemb.monitoring.private_log import private_log
from fedemb.protocol import simulated_fault

MIN_POLL_S = 0.01
WAITING = "waiting for"  # the start of a progress line; `fedemb deploy run` recognises it


def utc_clock_after(seconds: float) -> str:
    """HH:MM:SS (UTC) `seconds` from now: the deadline a progress line names."""
    return datetime.fromtimestamp(time.time() + seconds, timezone.utc).strftime("%H:%M:%S")


def send_and_collect(grid: Grid, messages: Sequence[Message], *, server_round: int, timeout_s: float,
                     progress_every_s: float, poll_s: float = 1.0) -> list[Message]:
    """Push `messages`, then pull replies (every 5 % of the time waited so far, at least every `poll_s`
    seconds) until every message has one or `timeout_s` has passed; every `progress_every_s` seconds of
    waiting, one private line naming the nodes still awaited and the deadline."""
    message_ids = list(grid.push_messages(messages))
    awaiting = {mid: msg.metadata.dst_node_id for mid, msg in zip(message_ids, messages) if mid}
    started = time.monotonic()
    deadline = started + timeout_s
    deadline_utc = utc_clock_after(timeout_s)
    next_report = started + progress_every_s
    replies: list[Message] = []
    while awaiting:
        for reply in grid.pull_messages(list(awaiting)):
            node = awaiting.pop(reply.metadata.reply_to_message_id, None)
            fault = simulated_fault(reply)
            if fault:  # stands for a reply after the deadline: discarded, so its node is missing, as a real one
                private_log.info("round %d: node %s: simulated %s: its reply counts as arrived after the deadline",
                                 server_round, node, fault)
                continue
            replies.append(reply)
        now = time.monotonic()
        if not awaiting or now >= deadline:
            break
        if now >= next_report:
            nodes = " ".join(str(n) for n in sorted(awaiting.values()))
            private_log.info("round %d: %s %d of %d replies until %s UTC (simulation.round_timeout_s = %g s): "
                             "nodes %s", server_round, WAITING, len(awaiting), len(messages), deadline_utc,
                             timeout_s, nodes)
            next_report = now + progress_every_s
        # a pull costs a request to the SuperLink: ask rarely in long waits, but ask often early on, so a
        # round of a second is not rounded up to the next whole poll (the wait overshoots by <= 5 %)
        time.sleep(max(0.0, min(poll_s, max(MIN_POLL_S, 0.05 * (now - started)), deadline - now)))
    return replies
