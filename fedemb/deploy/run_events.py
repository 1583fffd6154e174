"""The operator's view of a running deployment: the new lines of the run's server-private event log
(RUN/private/events.log: devices online, the nodes a round still waits for and until when, rejected or
missing replies), with node ids shown with the names they were registered under, each line marked
[server-private] because it names devices of the round's secret sample."""

from __future__ import annotations

import re
from pathlib import Path

from fedemb.run_dir import PRIVATE_DIR

MARK = "[server-private]"
NODE_ID = re.compile(r"\b\d{6,20}\b")  # Flower node ids are unsigned 64-bit integers


class EventTail:
    def __init__(self, run_dir: Path, names_by_node_id: dict[int, str]):
        self.file = run_dir / PRIVATE_DIR / "events.log"
        self.names = names_by_node_id
        self.offset = 0

    def new_lines(self) -> list[str]:
        """The complete lines written since the last call, node ids named."""
        if not self.file.is_file():
            return []
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [f"{MARK} {self.named(line)}" for line in complete.decode(errors="replace").splitlines() if line]

    def named(self, line: str) -> str:
        def name(match: re.Match) -> str:
            node = int(match.group())
            return f"{self.names[node]} ({node})" if node in self.names else match.group()
        return NODE_ID.sub(name, line)
