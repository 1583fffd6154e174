"""Server-private log lines: events that name devices or carry exact statistics of a round (a rejected
reply and its norm, a node that did not answer, how many devices are online). They go to the run's
private/events.log, never to the console, unless the operator asks for them there
(monitoring.private_console), in which case each line is marked [server-private]."""

from __future__ import annotations

import logging
from pathlib import Path

from fedemb.run_dir import private_dir

private_log = logging.getLogger("fedemb.private")
private_log.propagate = False  # never reaches Flower's or Python's console handlers
private_log.addHandler(logging.NullHandler())
private_log.setLevel(logging.INFO)

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class PrivateLog:
    """Attach the run's private event log (and optionally a marked console echo) while a run lasts."""

    def __init__(self, run_dir: Path, echo_to_console: bool = False):
        self.handlers: list[logging.Handler] = [logging.FileHandler(private_dir(run_dir) / "events.log")]
        if echo_to_console:
            self.handlers.append(logging.StreamHandler())
            self.handlers[-1].setFormatter(logging.Formatter("[server-private] " + _FORMAT))
        self.handlers[0].setFormatter(logging.Formatter(_FORMAT))

    def __enter__(self) -> "PrivateLog":
        for h in self.handlers:
            private_log.addHandler(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            private_log.removeHandler(h)
            h.close()
