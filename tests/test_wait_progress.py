"""While the server waits (for devices to come online, for a round's replies) it says, in its private
event log, which nodes it waits for and until when; nothing of it reaches the console."""

import logging
import re

import pytest
from flwr.app import Message, RecordDict

from fedemb.errors import FedembError
from fedemb.monitoring.private_log import private_log
from strategies.device_sampling import wait_for_devices
from strategies.reply_collection import send_and_collect


class SlowGrid:
    """Nodes 7 and 9 get work; 7 answers at once, 9 never does."""

    def __init__(self):
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            ids.append(f"m{i}")
        self.pushed = list(messages)
        return ids

    def pull_messages(self, message_ids):
        return [Message(RecordDict(), reply_to=m) for m in self.pushed
                if m.metadata.dst_node_id == 7 and m.metadata.message_id in set(message_ids)]


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def private_lines():
    handler = Capture()
    private_log.addHandler(handler)
    yield handler.lines
    private_log.removeHandler(handler)


def test_a_round_says_privately_which_nodes_it_waits_for_and_until_when(private_lines, capsys, flower_identity):
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 9)]
    replies = send_and_collect(SlowGrid(), messages, server_round=3, timeout_s=0.5, progress_every_s=0.1, poll_s=0.05)
    assert [r.metadata.src_node_id for r in replies] == [7]  # the reply that came; 9 is left to the strategy
    waits = [line for line in private_lines if "waiting for" in line]
    assert 2 <= len(waits) <= 6  # every 0.1 s of a 0.5 s wait, not every poll
    assert re.fullmatch(r"round 3: waiting for 1 of 2 replies until \d\d:\d\d:\d\d UTC "
                        r"\(simulation.round_timeout_s = 0.5 s\): nodes 9", waits[0]), waits[0]
    out = capsys.readouterr()
    assert "nodes 9" not in out.out + out.err


def test_waiting_for_devices_names_those_online_and_the_deadline(private_lines, flower_identity):
    class Online:
        calls = 0

        def get_node_ids(self):
            Online.calls += 1
            return [11] if Online.calls < 4 else [11, 12]

    assert wait_for_devices(Online(), 2, timeout_s=5.0, progress_every_s=0.01, poll_s=0.01) == 2
    waits = [line for line in private_lines if "waiting for" in line]
    assert waits and re.fullmatch(r"waiting for devices: 1 of 2 online until \d\d:\d\d:\d\d UTC "
                                  r"\(deployment.wait_s = 5 s\): nodes 11", waits[0]), waits
    assert private_lines[-1] == "2 devices online: nodes 11 12"

    class Never:
        def get_node_ids(self):
            return [11]

    with pytest.raises(FedembError, match=r"only 1 of the 2 devices .* after 0 s \(deployment.wait_s\)"):
        wait_for_devices(Never(), 2, timeout_s=0.2, progress_every_s=0.05, poll_s=0.05)
