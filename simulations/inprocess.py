"""A Flower Grid that delivers each message to the ClientApp's train function in this process.

No Ray, no SuperLink: the strategy, the messages, the ClientApp code and the replies are the real ones,
only the transport is a function call. The privacy audit runs thousands of short runs through it, and
tests drive the strategy's round loop with it. A ClientApp that raises becomes an error reply, as in
Flower's own engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

TrainFn = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    def __init__(self, train: TrainFn, num_nodes: int, run_id: int = 1):
        self.train = train
        self.node_ids = list(range(1, num_nodes + 1))
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.node_ids}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Runs each message's ClientApp at once; its reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            try:
                reply = self.train(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a failing client is a reply, never a crash
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
