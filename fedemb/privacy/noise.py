"""Gaussian noise for the aggregate, from a cryptographically secure stream.

The stream is ChaCha20 (OpenSSL, through the `cryptography` package) under a 256-bit key: fresh OS
randomness by default, or the PRF of the seed (run.seed) for reproducible runs, whose noise is then
predictable. Every draw (`sample`, `add`, `draw_scalar`) is its own keystream, nonce = the draw's
number, so the generator's whole state is that counter. Uniforms take 53 bits of the keystream each;
Box–Muller turns pairs of them into standard normals in float64, cast to float32 for the model.

Known limit: this is Gaussian sampling in floating point, not a discrete Gaussian; the low-order bits
of floating-point samples can leak information in principle (precision attacks on floating-point DP
noise are known). The guarantee is that of the continuous Gaussian mechanism up to that caveat.

Only a seeded generator's state is saved in checkpoints. An unseeded generator is never saved or
restored: a resumed run draws fresh noise, because reusing noise on a re-computed aggregate would
reveal the difference.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedemb.privacy.clipping import Update
from fedemb.privacy.keyed_random import SECRET_BYTES, Secret, keyed_bytes
from fedemb.privacy.streams import STREAM_NOISE

_CHUNK_PAIRS = 1 << 19  # normals are made in chunks of 2^20 (16 MiB of float64 at a time)


class GaussianNoise:
    def __init__(self, std: float, seed: Secret | None = None):
        """`seed`: None for OS randomness; an int seed or a bytes secret for a reproducible stream."""
        self.std = std
        self.predictable = seed is not None
        self._key = keyed_bytes(seed, STREAM_NOISE) if seed is not None else secrets.token_bytes(SECRET_BYTES)
        self._draws = 0

    def standard_normal(self, n: int) -> np.ndarray:
        """n standard normals (float64) from the next keystream."""
        nonce = (0).to_bytes(4, "little") + self._draws.to_bytes(12, "little")  # block counter 0, nonce = draw
        self._draws += 1
        stream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        out = np.empty(n, dtype=np.float64)
        pairs = -(-n // 2)
        zeros = bytes(16 * min(_CHUNK_PAIRS, pairs))
        keystream = np.empty(len(zeros), dtype=np.uint8)
        for start in range(0, pairs, _CHUNK_PAIRS):
            m = min(_CHUNK_PAIRS, pairs - start)
            stream.update_into(memoryview(zeros)[:16 * m], memoryview(keystream))
            words = keystream[:16 * m].view("<u8").reshape(m, 2) >> np.uint64(11)
            u1 = (words[:, 0] + 1).astype(np.float64) * (1.0 / (1 << 53))  # (0, 1]: log is finite
            u2 = words[:, 1].astype(np.float64) * (2.0 * np.pi / (1 << 53))
            radius = np.sqrt(-2.0 * np.log(u1))
            z = np.empty((m, 2), dtype=np.float64)
            np.multiply(radius, np.cos(u2), out=z[:, 0])
            np.multiply(radius, np.sin(u2), out=z[:, 1])
            lo = 2 * start
            out[lo:lo + 2 * m] = z.reshape(-1)[:n - lo]
        return out

    def sample(self, shapes: dict[str, torch.Size], std: float) -> Update:
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()]
        z = self.standard_normal(sum(sizes)) * std
        out, at = {}, 0
        for (k, shape), size in zip(shapes.items(), sizes):
            out[k] = torch.from_numpy(z[at:at + size].astype(np.float32)).reshape(shape)
            at += size
        return out

    def add(self, total: Update, std: float | None = None) -> Update:
        std = self.std if std is None else std
        if std == 0:
            return {k: v.clone() for k, v in total.items()}
        noise = self.sample({k: v.shape for k, v in total.items()}, std)
        return {k: v + noise[k].to(v.dtype) for k, v in total.items()}

    def draw_scalar(self, std: float) -> float:
        return float(std * self.standard_normal(1)[0])

    def state_dict(self) -> dict:
        return {"draws": self._draws} if self.predictable else {}

    def load_state_dict(self, state: dict) -> None:
        if self.predictable and "draws" in state:
            self._draws = int(state["draws"])
