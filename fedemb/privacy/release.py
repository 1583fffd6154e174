"""One way to release: the ledger entry is written before the noise is drawn.

Every DP release outside the federated rounds (synthesis, its baselines, its sweeps) goes through
`release(ledger, entry, noise, draw)`. It records the entry in the ledger, which writes it to disk
(atomically, fsynced) before returning, and only then hands `draw` the entry's own noise. A ledger that
cannot be written raises, and nothing is drawn. `LedgerStage` is what synthesis uses: one stage of a
ledger, whose Gaussian releases of arrays are named and noised in one call.

No two releases share noise. Each entry's noise is its own ChaCha20 stream (fedemb.privacy.noise) under
a key derived from the source's secret and the entry's (stage, release, attempt), and a key is released
once: `release` refuses an entry the ledger already holds. So a sweep point, recorded as its own stage,
draws fresh noise, and publishing it next to the release does not reveal the difference of two noisy
values with the same noise. The secret is OS randomness; a seed (tests, reproduction) makes the noise
reproducible and therefore predictable from the seed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedemb.privacy.keyed_random import keyed_bytes, keyed_seed
from fedemb.privacy.ledger import SAMPLED_GAUSSIAN, LedgerEntry, PrivacyLedger
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.streams import STREAM_RELEASES

T = TypeVar("T")


class EntryNoise:
    """The noise of one ledger entry: standard normals from its own stream, and a seed for libraries that
    draw their own noise (Opacus)."""

    def __init__(self, key: bytes):
        self._key = key
        self._stream = GaussianNoise(1.0, key)

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._stream.standard_normal(int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def seed(self, stream: int = 0) -> int:
        """A 63-bit seed per stream (e.g. Opacus's sampling and its noise), from the entry's key."""
        return keyed_seed(self._key, STREAM_RELEASES, stream)


class NoiseSource:
    """Where releases get their noise: a 256-bit secret (OS randomness, or derived from `seed`)."""

    def __init__(self, seed: int | None = None):
        self.predictable = seed is not None
        self._secret = keyed_bytes(seed, STREAM_RELEASES) if seed is not None else secrets.token_bytes(32)

    def for_entry(self, entry: LedgerEntry) -> EntryNoise:
        return EntryNoise(hmac.new(self._secret, json.dumps(entry.key).encode(), hashlib.sha256).digest())


def release(ledger: PrivacyLedger, entry: LedgerEntry, noise: NoiseSource, draw: Callable[[EntryNoise], T]) -> T:
    """Record `entry` (on disk when the ledger has a file), then return `draw(the entry's noise)`."""
    if any(e.key == entry.key for e in ledger.entries):
        raise RuntimeError(f"the ledger already holds a release {entry.key}: a release is recorded once, and "
                           "its noise is never drawn again")
    ledger.record(entry)
    return draw(noise.for_entry(entry))


def gaussian_entry(stage: str, name: str, z: float, sensitivity: float, mechanism: str, unit: str,
                   details: dict | None = None, q: float = 1.0, steps: int = 1, neighbouring: str = "") -> LedgerEntry:
    """A (sampled) Gaussian release: noise std z · sensitivity, sampling rate q, `steps` compositions;
    `neighbouring`: the relation the sensitivity is for ("": add/remove)."""
    return LedgerEntry(stage=stage, release=name, mechanism=mechanism, neighbouring=neighbouring,
                       accounting={"kind": SAMPLED_GAUSSIAN, "z": float(z), "q": float(q), "steps": int(steps)},
                       unit=unit, sampling_rate=float(q), noise_multiplier=float(z), steps=int(steps),
                       sensitivity=float(sensitivity), details=dict(details or {}))


def standard_normal(noise: EntryNoise, shape: tuple[int, ...]) -> np.ndarray:
    return noise.normal(shape)


@dataclass
class LedgerStage:
    """One stage of a ledger (e.g. `synthesis/gmm 2`): its releases, each recorded before its noise."""

    ledger: PrivacyLedger
    name: str
    noise: NoiseSource

    @classmethod
    def new(cls, ledger: PrivacyLedger, prefix: str, noise: NoiseSource) -> "LedgerStage":
        """A stage no entry of the ledger uses yet (`prefix 1`, `prefix 2`, ...): a new synthesis counts again."""
        taken = {e.stage for e in ledger.entries}
        n = 1
        while f"{prefix} {n}" in taken:
            n += 1
        return cls(ledger, f"{prefix} {n}", noise)

    def sub(self, suffix: str) -> "LedgerStage":
        """A stage of its own next to this one (its baselines, a sweep point), with the same noise source."""
        return LedgerStage(self.ledger, f"{self.name} {suffix}", self.noise)

    def gaussian(self, name: str, exact: np.ndarray, z: float, sensitivity: float, mechanism: str,
                 details: dict | None = None,
                 unit_noise: Callable[[EntryNoise, tuple], np.ndarray] = standard_normal,
                 neighbouring: str = "") -> np.ndarray:
        """exact + z · sensitivity · (standard normal noise of exact's shape, or `unit_noise`'s)."""
        entry = gaussian_entry(self.name, name, z, sensitivity, mechanism, self.ledger.unit, details,
                               neighbouring=neighbouring)
        exact = np.asarray(exact, dtype=np.float64)
        return release(self.ledger, entry, self.noise,
                       lambda noise: exact + z * sensitivity * unit_noise(noise, exact.shape))

    def run(self, entry: LedgerEntry, draw: Callable[[EntryNoise], T]) -> T:
        """Any other mechanism of the stage (e.g. DP-SGD): `entry` must name this stage."""
        if entry.stage != self.name:
            raise ValueError(f"entry of stage {entry.stage!r} released through stage {self.name!r}")
        return release(self.ledger, entry, self.noise, draw)

    @property
    def entries(self) -> list[LedgerEntry]:
        return [e for e in self.ledger.entries if e.stage == self.name]

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon_of(self.entries)
