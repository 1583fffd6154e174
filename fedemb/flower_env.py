"""The environment fedemb runs Flower and Ray in: offline, on no cluster unless asked, without notices
a user cannot act on. For this process, or for a Flower process about to be started."""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping


def offline_flower_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """No telemetry, no runtime dependency installation, and no silent attachment to a Ray cluster
    (in this process's environment, or in `env` for a process about to be started)."""
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")


# Third-party notices that a user of fedemb cannot act on, silenced narrowly: (category, message start,
# module that raises it). Ray's tip at ray.init is about a future default for workers that request
# no GPU; fedemb's workers request GPUs only through simulation.gpus_per_client.
THIRD_PARTY_NOTICES = [
    (FutureWarning, "Tip: In future versions of Ray, Ray will no longer override accelerator", r"ray\._private\.worker"),
]


def silence_third_party_notices() -> None:
    for category, message, module in THIRD_PARTY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
