"""How much each object's share reveals about its pixels.

Pixel shares (L1 edges, L2 segments) are measured by a plug-in histogram estimate of the mutual
information between a pixel's raw intensity and the shared value at that pixel, pooled over the
references' pixels inside the object. It looks at one pixel at a time, so it misses what spatial
structure gives away (edges can be integrated back into intensity differences): a per-pixel measure,
not a bound. Segments are intensities and are binned like the raw pixels, on [0, 1], so an exact copy
scores H(raw); edge magnitudes are binned on their own range. DP embeddings are bounded instead: a
unit vector plus N(0, σ² I) noise is d parallel Gaussian channels under total power radius², whose
capacity bounds the information per released vector.
"""

from __future__ import annotations

import math

import numpy as np

from fedemb.synth.sanitize import Payload
from fedemb.synth.task_spec import CustomTask, object_masks


def pixel_mutual_information(raw: np.ndarray, shared: np.ndarray | None, region: np.ndarray,
                             bins: int = 16, shared_range: tuple[float, float] | None = None) -> dict:
    """raw (n, C, H, W) in [0, 1]; shared (n, H, W) or (n, C, H, W) (averaged over channels) or None
    for nothing shared; region (n, H, W) bool. MI and H(raw) in bits on `bins` equal bins; the shared
    values are binned on `shared_range`, or on their own range when None."""
    intensity = raw.mean(axis=1)[region]
    raw_bins = np.minimum((np.clip(intensity, 0, 1) * bins).astype(np.int64), bins - 1)
    raw_entropy = _entropy_bits(np.bincount(raw_bins, minlength=bins))
    if shared is None or intensity.size == 0:
        return {"mi_bits": 0.0, "raw_entropy_bits": raw_entropy, "fraction": 0.0}
    values = (shared.mean(axis=1) if shared.ndim == raw.ndim else shared)[region].astype(np.float64)
    low, high = shared_range if shared_range is not None else (values.min(), values.max())
    if high > low:
        shared_bins = np.clip(((values - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)
    else:
        shared_bins = np.zeros(len(values), dtype=np.int64)
    joint = np.bincount(raw_bins * bins + shared_bins, minlength=bins * bins).reshape(bins, bins)
    mi = max(0.0, raw_entropy + _entropy_bits(joint.sum(axis=0)) - _entropy_bits(joint.ravel()))
    return {"mi_bits": mi, "raw_entropy_bits": raw_entropy, "fraction": mi / raw_entropy if raw_entropy > 0 else 0.0}


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def embedding_channel_bound_bits(dim: int, sigma: float, radius: float = 1.0) -> float:
    """(d/2)·log2(1 + radius²/(d σ²)): the most a release of a vector of norm <= radius can carry."""
    if sigma <= 0:
        return math.inf
    return dim / 2 * math.log2(1 + radius**2 / (dim * sigma**2))


def object_privacy_report(task: CustomTask, payload: Payload) -> dict[str, dict]:
    """Per object: its level, the pixel MI of what its level shares, and its embedding's bound per reference."""
    report = {}
    for obj, region in object_masks(task.masks, task.objects).items():
        level = payload.level(obj)
        shared = {"L0": None, "L1": payload.edges.get(obj), "L2": payload.segments.get(obj)}[level]
        entry = {"level": level, **pixel_mutual_information(task.references, shared, region,
                                                            shared_range=(0.0, 1.0) if level == "L2" else None),
                 "embedding_epsilon": task.policy[obj].embedding_epsilon, "embedding_mi_bound_bits": None}
        if obj in payload.releases:
            entry["embedding_mi_bound_bits"] = embedding_channel_bound_bits(
                payload.embeddings[obj].shape[1], payload.releases[obj].noise_std)
        report[obj] = entry
    return report
