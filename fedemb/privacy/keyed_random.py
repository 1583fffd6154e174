"""Counter-based keyed randomness: every draw is a pseudorandom function (PRF) of (secret, counters).

A user's grouping draw is keyed by (secret, round, user id, stream), so no user's slot depends on
which other users exist. That is what keeps the sensitivity argument of the grouping: adding or
removing one user cannot move anybody else. The cohort itself is drawn by counters (round, draw) over
the positions of the user-id array (fedemb.privacy.sampling), so a round costs what its cohort costs.

The PRF must also resist inversion: nodes receive values derived from the server's secret (the
training key), and anyone who could recover the secret from them could compute who was sampled in
every round, which voids the amplification by sampling the accountant counts on. So the draws are
cryptographic:

- the AES-256 key is HMAC-SHA256(secret, label); the secret is the run's 256-bit server secret
  (`run_secret`), or an int seed for reproducible runs and tests (predictable by design);
- the counters are 64-bit words, prefixed by their number (and the kind of output), packed two per
  16-byte block and chained by CBC-MAC under that key. Length-prefixed CBC-MAC over AES is a PRF
  (AES is a PRP; the prefix makes the messages prefix-free); outputs of distinct counter tuples are
  indistinguishable from independent uniform draws, and no output tells anything about the secret
  or about any other output.

Why AES and not keyed BLAKE2b per element: draws come in arrays (a cohort's draws, or every user for
limited participation), and AES-ECB through OpenSSL (the `cryptography` package) processes all of them
in one vectorized call per block (10^6 counters in tens of milliseconds), where hashlib's BLAKE2b costs
a Python call per element (about 1.5 s for 10^6 on one core).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# the stream ids live in fedemb.privacy.streams; the nodes' three are re-exported for client_task
from fedemb.privacy.streams import STREAM_FAULTS, STREAM_HEAD_ANCHORS, STREAM_RUN_SECRET, STREAM_TRAINING  # noqa: F401

SECRET_BYTES = 32
Secret = int | bytes

_LABEL = b"fedemb keyed draws: AES-256 CBC-MAC key, v1"
_KIND_WORDS, _KIND_BYTES = 0, 1  # what the PRF output is used as, mixed into the length prefix


def _secret_bytes(secret: Secret) -> bytes:
    if isinstance(secret, bytes):
        return b"bytes:" + secret
    if isinstance(secret, (int, np.integer)) and not isinstance(secret, bool):
        return b"int:" + str(int(secret)).encode()
    raise TypeError(f"a keyed-random secret is an int seed or bytes, not {type(secret).__name__}")


@lru_cache(maxsize=256)
def _aes_key(secret: Secret) -> bytes:
    return hmac.new(_secret_bytes(secret), _LABEL, hashlib.sha256).digest()


def _words(value) -> np.ndarray:
    """An integer (or integer array) as 64-bit words: int64 and uint64 with the same bits are the same key."""
    a = np.asarray(value)
    if a.dtype.kind == "u" or a.dtype == np.bool_:
        return a.astype(np.uint64)
    if a.dtype.kind == "i":
        return a.astype(np.int64).view(np.uint64)
    raise TypeError(f"keyed draws take integer keys, not {a.dtype} ({value!r:.60})")


def _prf(secret: Secret, keys: tuple, kind: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 128-bit PRF output for every broadcast key tuple: an (n, 2) uint64 array, and the shape."""
    parts = np.broadcast_arrays(*[_words(k) for k in keys]) if keys else []
    shape = parts[0].shape if parts else ()
    n = int(np.prod(shape, dtype=np.int64))
    width = 1 + len(keys) + (len(keys) + 1) % 2  # length prefix + keys, padded to whole blocks
    words = np.zeros((n, width), dtype="<u8")
    words[:, 0] = len(keys) | (kind << 32)
    for i, part in enumerate(parts):
        words[:, 1 + i] = part.reshape(-1)
    if n == 0:
        return np.zeros((0, 2), dtype="<u8"), shape
    encrypt = Cipher(algorithms.AES(_aes_key(secret)), modes.ECB()).encryptor()
    out = np.empty(16 * n + 16, dtype=np.uint8)  # OpenSSL may ask for one spare block
    state = out[:16 * n].view("<u8").reshape(n, 2)
    state[:] = 0
    block = np.empty((n, 2), dtype="<u8")
    for b in range(width // 2):
        np.bitwise_xor(state, words[:, 2 * b:2 * b + 2], out=block)
        encrypt.update_into(memoryview(block).cast("B"), memoryview(out))
    return state, shape


def keyed_hash(secret: Secret, *keys) -> np.ndarray:
    """64 pseudorandom bits per broadcast tuple of integer keys, under the secret (uint64 array)."""
    state, shape = _prf(secret, keys, _KIND_WORDS)
    return np.asarray(state[:, 0].astype(np.uint64).reshape(shape))


def keyed_uniform(secret: Secret, *keys) -> np.ndarray:
    """Uniform draws in [0, 1) with 53 bits, one per broadcast key tuple."""
    return (keyed_hash(secret, *keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keyed_seed(secret: Secret, *keys) -> int:
    """A 63-bit integer seed for torch/numpy generators, from integer keys."""
    return int(keyed_hash(secret, *keys)) & ((1 << 63) - 1)


def keyed_bytes(secret: Secret, *keys: int, size: int = SECRET_BYTES) -> bytes:
    """`size` pseudorandom bytes for one tuple of integer keys (e.g. a key for another cipher)."""
    blocks = -(-size // 16)
    state, _ = _prf(secret, tuple(int(k) for k in keys) + (np.arange(blocks, dtype=np.uint64),), _KIND_BYTES)
    return state.tobytes()[:size]


def run_secret(seed: int) -> bytes:
    """The server's secret for a run: 256 bits of OS randomness; with run.seed >= 0 (tests,
    reproduction) derived from the seed instead, reproducible and therefore predictable."""
    return keyed_bytes(seed, STREAM_RUN_SECRET) if seed >= 0 else secrets.token_bytes(SECRET_BYTES)
