"""The privacy ledger: every DP release of a run, one entry each, with the cumulative (ε, δ).

An entry is written to `privacy.json` (atomically, fsynced) before its release is computed or used,
so a crash can only leave the ledger over-counting. The cumulative ε composes all entries with one
Opacus accountant (RDP or PRV):

- a sampled-Gaussian release adds (z, q, steps) to the accountant's history;
- a tree-aggregation release (DP-FTRL) states the whole tree so far as one Gaussian mechanism
  (z_eq, q = 1, 1 step); a later entry of the same tree replaces the earlier one.

Entries are keyed by (stage, release, attempt). Recording a key that is already there with the same
accounting is a no-op: a seeded run resumed from a checkpoint replays bit-identical releases, which
reveal nothing new. A run with OS-seeded noise resumes under a new attempt number instead, so a
re-run round counts again.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedemb.privacy.accountant import composed_epsilon
from fedemb.run_dir import write_json

SAMPLED_GAUSSIAN = "sampled_gaussian"
TREE = "tree"


@dataclass
class LedgerEntry:
    stage: str  # "training", later "synthesis/..."
    release: str  # e.g. "round 3"
    mechanism: str  # what was released, in words
    accounting: dict  # {"kind": "sampled_gaussian", "z", "q", "steps"} or {"kind": "tree", "key", "z"} or {"kind": "none"}
    round: int | None = None  # the training round it belongs to, if any
    unit: str = "user"
    sampling_rate: float = 1.0
    noise_multiplier: float = 0.0  # std / sensitivity, as the accountant sees it
    steps: int = 1
    sensitivity: float = 0.0  # absolute L2 sensitivity of the release
    attempt: int = 0
    details: dict = field(default_factory=dict)
    epsilon: float = math.nan  # cumulative, after this entry
    delta: float = math.nan

    @property
    def key(self) -> tuple[str, str, int]:
        return self.stage, self.release, self.attempt

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class PrivacyLedger:
    def __init__(self, path: Path | None, delta: float, accountant: str = "rdp", unit: str = "user"):
        self.path = Path(path) if path is not None else None
        self.delta = delta
        self.accountant = accountant
        self.unit = unit
        self.entries: list[LedgerEntry] = []

    # ------------------------------------------------------------------ composition
    def history(self, entries: list[LedgerEntry]) -> list[tuple[float, float, int]] | None:
        """Opacus history for the entries; None when some release had no noise (ε = ∞)."""
        counts: Counter = Counter()
        trees: dict[str, float] = {}
        for e in entries:
            acc = e.accounting
            kind = acc.get("kind")
            if kind == "none":
                return None
            z = float(acc["z"])
            if z == 0:
                return None
            if kind == SAMPLED_GAUSSIAN:
                counts[(z, float(acc["q"]))] += int(acc["steps"])
            elif kind == TREE:
                trees[acc["key"]] = z
            else:
                raise ValueError(f"unknown accounting kind {kind!r}")
        for z in trees.values():
            if math.isfinite(z):
                counts[(z, 1.0)] += 1
        return [(z, q, steps) for (z, q), steps in sorted(counts.items())]

    def epsilon_of(self, entries: list[LedgerEntry]) -> float:
        history = self.history(entries)
        return math.inf if history is None else composed_epsilon(self.accountant, history, self.delta)

    @property
    def epsilon(self) -> float:
        return self.epsilon_of(self.entries)

    def epsilon_with(self, entry: LedgerEntry) -> float:
        """The cumulative ε if `entry` were recorded (without recording it)."""
        if self._existing(entry) is not None:
            return self.epsilon
        return self.epsilon_of(self.entries + [entry])

    # ------------------------------------------------------------------ recording
    def _existing(self, entry: LedgerEntry) -> LedgerEntry | None:
        for e in self.entries:
            if e.key == entry.key:
                if e.accounting != entry.accounting:
                    raise RuntimeError(f"ledger already holds {entry.key} with other accounting: "
                                       f"{e.accounting} != {entry.accounting}")
                return e
        return None

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Add the entry (unless it is a replay of one already there) and write the ledger to disk
        before returning: call this before the release is computed."""
        existing = self._existing(entry)
        if existing is not None:
            return existing
        entry.epsilon = self.epsilon_with(entry)
        entry.delta = self.delta
        self.entries.append(entry)
        self.save()
        return entry

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {"unit": self.unit, "accountant": self.accountant, "delta": self.delta,
                "epsilon": self.epsilon, "releases": len(self.entries),
                "entries": [e.to_json() for e in self.entries]}

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger":
        data = json.loads(Path(path).read_text())
        ledger = cls(path, float(data["delta"]), data["accountant"], data.get("unit", "user"))
        for raw in data["entries"]:
            raw = dict(raw)
            raw["epsilon"], raw["delta"] = float(raw["epsilon"]), float(raw["delta"])  # "inf" is a string in JSON
            ledger.entries.append(LedgerEntry(**raw))
        return ledger
