"""The privacy ledger: every DP release of a run, one entry each, with the cumulative (ε, δ).

An entry is written to `privacy.json` (atomically, fsynced) before its release is computed or used,
so a crash can only leave the ledger over-counting. The cumulative ε composes all entries with one
Opacus accountant (RDP or PRV):

- a sampled-Gaussian release adds (z, q, steps) to the accountant's history;
- a tree-aggregation release (DP-FTRL) states the whole tree so far as one Gaussian mechanism
  (z_eq, q = 1, 1 step); a later entry of the same tree replaces the earlier one.

Every entry states its neighbouring relation: add/remove (one user's data present or absent: sampled
Gaussian rounds, synthesis releases) or zero-out (one user's data replaced by nothing while the user
keeps its place in a public schedule: DP-FTRL). Guarantees under different relations do not compose
into one ε: a ledger that mixes them states a composed ε per relation (`epsilon_by_relation`) and no
single one (`epsilon` is then ∞, which no budget check can pass).

Entries are keyed by (stage, release, attempt). Recording a key that is already there with the same
accounting is a no-op: a seeded run resumed from a checkpoint replays bit-identical releases, which
reveal nothing new. Whether the replay really is identical is checked: a seeded release's SHA-256 is
stored in its entry before anything of it leaves the server (`confirm_release`), and a replay with
another digest is recorded again under a new attempt. A run with OS-seeded noise resumes under a new
attempt number instead, so a re-run round counts again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar
from pathlib import Path

import numpy as np

from fedemb.errors import ConcurrentReleaseError
from fedemb.privacy.accountant import composed_epsilon
from fedemb.run_dir import write_json

T = TypeVar("T")

SAMPLED_GAUSSIAN = "sampled_gaussian"
TREE = "tree"
ADD_REMOVE = "add/remove"  # neighbours: one user's data present or absent
ZERO_OUT = "zero-out"  # neighbours: one user's data replaced by nothing, its participation schedule unchanged
REPLACE_ONE = "replace-one"  # neighbours: one item (e.g. one reference image of an object) replaced by another
NEIGHBOURING = (ADD_REMOVE, ZERO_OUT, REPLACE_ONE)


def default_neighbouring(accounting: Mapping) -> str:
    """The relation of an entry that does not state one (ledgers written before entries did)."""
    return ZERO_OUT if accounting.get("kind") == TREE else ADD_REMOVE


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
    epsilon: float = math.nan  # cumulative over the entries of the same neighbouring relation, after this one
    delta: float = math.nan
    neighbouring: str = ""  # ADD_REMOVE or ZERO_OUT; "": the default of the accounting kind
    release_sha256: str = ""  # seeded runs: the digest of what was released (see release_digest)

    def __post_init__(self):
        self.neighbouring = self.neighbouring or default_neighbouring(self.accounting)
        if self.neighbouring not in NEIGHBOURING:
            raise ValueError(f"neighbouring relation must be one of {NEIGHBOURING}, got {self.neighbouring!r}")

    @property
    def key(self) -> tuple[str, str, int]:
        return self.stage, self.release, self.attempt

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def release_digest(update: Mapping, scalars: Mapping[str, float] | None = None) -> str:
    """SHA-256 of a release: every tensor's name, dtype, shape and bytes (in name order) and the
    released scalars. Equal digests: the same bits were released."""
    h = hashlib.sha256()
    for name in sorted(update):
        arr = np.ascontiguousarray(update[name].detach().cpu().numpy())
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    h.update(json.dumps({k: float(v) for k, v in (scalars or {}).items()}, sort_keys=True).encode())
    return h.hexdigest()


class PrivacyLedger:
    def __init__(self, path: Path | None, delta: float, accountant: str = "rdp", unit: str = "user"):
        self.path = Path(path) if path is not None else None
        self.delta = delta
        self.accountant = accountant
        self.unit = unit
        self.entries: list[LedgerEntry] = []
        self._seen: str | None = None  # the file as this object last read or wrote it (_identity)

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

    @staticmethod
    def relations(entries: list[LedgerEntry]) -> list[str]:
        return sorted({e.neighbouring for e in entries})

    def epsilon_of(self, entries: list[LedgerEntry]) -> float:
        """The composed ε of the entries; ∞ when they mix neighbouring relations (no single ε)."""
        if len(self.relations(entries)) > 1:
            return math.inf
        history = self.history(entries)
        return math.inf if history is None else composed_epsilon(self.accountant, history, self.delta)

    def epsilon_by_relation(self, entries: list[LedgerEntry] | None = None) -> dict[str, float]:
        entries = self.entries if entries is None else entries
        return {r: self.epsilon_of([e for e in entries if e.neighbouring == r]) for r in self.relations(entries)}

    @property
    def mixed(self) -> bool:
        return len(self.relations(self.entries)) > 1

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
                if e.accounting != entry.accounting or e.neighbouring != entry.neighbouring:
                    raise RuntimeError(f"ledger already holds {entry.key} with other accounting: "
                                       f"{e.accounting} ({e.neighbouring}) != {entry.accounting} ({entry.neighbouring})")
                return e
        return None

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Add the entry (unless it is a replay of one already there) and write the ledger to disk
        before returning: call this before the release is computed. Returns the entry held.

        Another process may release into the same ledger file meanwhile (two `fedemb synth` commands on
        one run): every write happens under an exclusive lock after reading back what others wrote
        (`_write`), so neither process's releases are lost; an entry another process already recorded
        under this key is refused."""
        def add() -> LedgerEntry:
            existing = self._existing(entry)
            if existing is not None:
                return existing
            entry.epsilon = self.epsilon_of([e for e in self.entries if e.neighbouring == entry.neighbouring]
                                            + [entry])
            entry.delta = self.delta
            self.entries.append(entry)
            return entry
        return self._write(add, entry)

    def confirm_release(self, entry: LedgerEntry, digest: str) -> bool:
        """Store the digest of the release `entry` (an entry of this ledger) accounts for, on disk
        before returning: call this after the release is computed and before any of it leaves the
        server. False, and nothing stored, when the entry holds another digest: the release is not the
        one accounted for, so it must be recorded as a new release before it is used."""
        if entry.release_sha256 == digest:
            return True
        if entry.release_sha256:
            return False
        entry.release_sha256 = digest
        self._write(lambda: None)
        return True

    def _write(self, change: Callable[[], T], adding: LedgerEntry | None = None) -> T:
        """Under the file's lock: read back what other processes wrote since this one last read or wrote
        the file, apply `change`, write the ledger (unless `change` added nothing new to an entry that
        was already there)."""
        with self._locked():
            self._merge_written_by_others(adding)
            before = len(self.entries)
            result = change()
            if adding is None or len(self.entries) > before:
                self.save()
        return result

    @contextmanager
    def _locked(self):
        if self.path is None or not self.path.parent.is_dir():
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _merge_written_by_others(self, adding: LedgerEntry | None) -> None:
        if self.path is None or not self.path.is_file() or _identity(self.path) == self._seen:
            return  # nobody else wrote since this process last read or wrote the file
        own = {e.key for e in self.entries}
        others = [e for e in PrivacyLedger.load(self.path).entries if e.key not in own]
        if adding is not None and any(e.key == adding.key for e in others):
            raise ConcurrentReleaseError(f"another process recorded the release {adding.key} in {self.path} "
                                         "meanwhile; nothing was released: run this command again")
        self.entries.extend(others)

    # ------------------------------------------------------------------ resuming
    def continuation_problem(self, *, delta: float, accountant: str, stage: str, completed_round: int,
                             expected_entry: Callable[[int, int], LedgerEntry]) -> str | None:
        """Why this ledger cannot account for a run continued after `completed_round` with the given
        settings (None when it can). `expected_entry(round, attempt)` is the entry the run's mechanism
        would write for that round."""
        if accountant != self.accountant:
            return f"the ledger composes with the {self.accountant} accountant, the config with {accountant}"
        if not math.isclose(delta, self.delta, rel_tol=1e-9):
            return f"the ledger's δ is {self.delta:.6g}, the config's {delta:.6g}"
        own = [e for e in self.entries if e.stage == stage]
        expected = expected_entry(max(completed_round, 1), 0)
        mechanisms = sorted({e.mechanism for e in own})
        if own and mechanisms != [expected.mechanism]:
            return f"the ledger's {stage} releases are {', '.join(mechanisms)}, the config's are {expected.mechanism}"
        relations = self.relations(own)
        if own and relations != [expected.neighbouring]:
            return (f"the ledger's {stage} releases are under {', '.join(relations)} neighbours, "
                    f"the config's under {expected.neighbouring}")
        recorded = {e.round for e in own}
        missing = [r for r in range(1, completed_round + 1) if r not in recorded]
        if missing:
            shown = ", ".join(str(r) for r in missing[:5]) + (", ..." if len(missing) > 5 else "")
            return (f"the run state has completed round {completed_round} but the ledger has no entry for "
                    f"round{'s' if len(missing) > 1 else ''} {shown} (the ledger does not belong to this state)")
        if own:
            last = max(own, key=lambda e: (e.round or 0, e.attempt))
            again = expected_entry(last.round or 0, last.attempt)
            if again.accounting != last.accounting:
                return (f"the ledger accounts {last.release} as {last.accounting}, the config would account it as "
                        f"{again.accounting} (the noise, sampling or participation settings changed)")
        return None

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {"unit": self.unit, "accountant": self.accountant, "delta": self.delta,
                "epsilon": self.epsilon, "neighbouring": self.relations(self.entries),
                "epsilon_by_relation": self.epsilon_by_relation(), "releases": len(self.entries),
                "entries": [e.to_json() for e in self.entries]}

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.to_json())
            self._seen = _identity(self.path)

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger":
        raw = Path(path).read_bytes()
        data = json.loads(raw)
        ledger = cls(path, float(data["delta"]), data["accountant"], data.get("unit", "user"))
        ledger._seen = _digest(raw)
        for raw in data["entries"]:
            raw = dict(raw)
            raw["epsilon"], raw["delta"] = float(raw["epsilon"]), float(raw["delta"])  # "inf" is a string in JSON
            ledger.entries.append(LedgerEntry(**raw))
        return ledger


def _identity(path: Path) -> str | None:
    """Which version of the file is on disk: the digest of its bytes (reading is cheap next to parsing)."""
    try:
        return _digest(path.read_bytes())
    except FileNotFoundError:
        return None


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
