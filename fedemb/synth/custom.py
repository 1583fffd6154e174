"""Server-side customized synthesis: images for a user's task from nothing but its payload.

Every reference yields `images_per_reference` copies, each with the reference's shared targets moved
by its own random shift of up to `shift` pixels (zero fill), so the copies differ. They are optimised
together by fedemb.synth.inversion with, per shared object:

- L2 segment: its pixels are put back after every step (they are known exactly) and start there;
- L1 edge map: the Sobel magnitude of the object's pixels (outside set to 0, as on the client) is
  pulled toward the shared one, inside the shared mask;
- DP embedding: the embedding of the object alone (the whole image when its mask is not shared) is
  pulled toward the noisy one, by cosine, with a weight scaled by 1 / (1 + d σ²), the squared cosine
  to expect between a unit vector and its noisy release: a release that is mostly noise steers little;

and, for the whole image, a class term toward class anchors (the federated model's DP prototype of
the class the task maps it to, else the mean of the class's shared embeddings), an optional
prior from released DP activation statistics (post-processing of a `synth invert` release), and total
variation and L2 priors. Labels come from the task. With everything at L0 and no anchors, nothing
steers the images: that is the L0-only baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedemb.synth.activation_stats import ActivationStatistics
from fedemb.synth.inversion import InversionSettings, invert
from fedemb.synth.sanitize import Payload
from fedemb.synth.task_spec import CustomSettings, custom_settings  # noqa: F401 (custom_settings: re-exported)


def shifted_fill(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a (..., H, W) moved by (dy, dx), zero fill."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@dataclass
class CopyTargets:
    """The payload's arrays repeated per copy (copy c of reference c // k), each copy shifted."""

    labels: np.ndarray  # (N,)
    reference: np.ndarray  # (N,) index of the reference
    masks: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]
    segments: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]


def copy_targets(payload: Payload, copies: int, shift: int, rng: np.random.Generator) -> CopyTargets:
    reference = np.repeat(np.arange(len(payload)), copies)
    moves = rng.integers(-shift, shift + 1, (len(reference), 2)) if shift > 0 else np.zeros((len(reference), 2), int)

    def per_copy(array: np.ndarray) -> np.ndarray:
        return np.stack([shifted_fill(array[r], int(dy), int(dx)) for r, (dy, dx) in zip(reference, moves)])

    return CopyTargets(payload.labels[reference], reference,
                       {o: per_copy(m) for o, m in payload.masks.items()},
                       {o: per_copy(e) for o, e in payload.edges.items()},
                       {o: per_copy(s) for o, s in payload.segments.items()},
                       {o: e[reference] for o, e in payload.embeddings.items()})


_SOBEL_DERIVATIVE = torch.tensor([-1.0, 0.0, 1.0])
_SOBEL_SMOOTH = torch.tensor([1.0, 2.0, 1.0])


def sobel_magnitude(images01: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): the same filter as scipy.ndimage.sobel (edge pixels repeated), per
    channel, magnitude averaged over channels, as on the client."""
    n, c, h, w = images01.shape
    planes = F.pad(images01.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    along_rows = torch.outer(_SOBEL_DERIVATIVE, _SOBEL_SMOOTH).view(1, 1, 3, 3)
    along_cols = torch.outer(_SOBEL_SMOOTH, _SOBEL_DERIVATIVE).view(1, 1, 3, 3)
    gy, gx = F.conv2d(planes, along_rows), F.conv2d(planes, along_cols)
    return torch.sqrt(gx**2 + gy**2 + 1e-12).view(n, c, h, w).mean(1)


def edge_term(mask: np.ndarray, edges: np.ndarray, weight: float):
    m = torch.as_tensor(mask, dtype=torch.float32)
    target = torch.as_tensor(edges, dtype=torch.float32)
    area = m.sum().clamp(min=1.0)

    def term(x: torch.Tensor) -> torch.Tensor:
        alone = (x + 1) / 2 * m[:, None]
        return weight * (((sobel_magnitude(alone) - target) ** 2) * m).sum() / area
    return term


def embedding_term(encode, mask: np.ndarray | None, noisy: np.ndarray, weight: float):
    target = F.normalize(torch.as_tensor(noisy, dtype=torch.float32), dim=1)
    m = torch.as_tensor(mask, dtype=torch.float32)[:, None] if mask is not None else None

    def term(x: torch.Tensor) -> torch.Tensor:
        seen = ((x + 1) / 2 * m) * 2 - 1 if m is not None else x
        return weight * (1 - F.cosine_similarity(encode(seen), target, dim=1)).mean()
    return term


def release_reliability(dim: int, noise_std: float) -> float:
    """E[cos²] between a unit vector and itself plus N(0, σ² I_d), to first order: 1 / (1 + d σ²)."""
    return 1.0 / (1.0 + dim * noise_std**2)


def segment_projection(targets: CopyTargets):
    if not targets.segments:
        return None
    known = torch.zeros((len(targets.labels), 1, *next(iter(targets.masks.values())).shape[1:]), dtype=torch.bool)
    values = None
    for obj, segment in targets.segments.items():
        m = torch.as_tensor(targets.masks[obj])[:, None]
        s = torch.as_tensor(segment, dtype=torch.float32) * 2 - 1
        values = torch.where(m, s, values if values is not None else s)
        known |= m

    def project(x: torch.Tensor) -> None:
        x.copy_(torch.where(known, values, x))
    return project


def class_anchors(payload: Payload, population_prototypes: np.ndarray | None) -> np.ndarray | None:
    """One unit anchor per task class, or None when some class has none (then no class term). A DP
    prototype averages many users and beats a few single-image releases; those serve unmapped classes."""
    anchors = []
    shared = [o for o in ("foreground", "background") if o in payload.embeddings]
    for c, proto in enumerate(payload.prototypes):
        rows = payload.labels == c
        if population_prototypes is not None and 0 <= proto < len(population_prototypes):
            mean = population_prototypes[proto]
        elif shared and rows.any():
            mean = payload.embeddings[shared[0]][rows].mean(0)
        else:
            return None
        anchors.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(anchors).astype(np.float32)


def synthesize(net: nn.Module, payload: Payload, settings: CustomSettings, seed: int,
               centre: np.ndarray | None = None, population_prototypes: np.ndarray | None = None,
               stats: ActivationStatistics | None = None, progress=None) -> tuple[np.ndarray, CopyTargets, dict]:
    """Synthetic images (N, C, H, W) in [0, 1], the per-copy targets (labels among them), a summary."""
    targets = copy_targets(payload, settings.images_per_reference, settings.shift, np.random.default_rng(seed))
    centre_t = torch.as_tensor(centre, dtype=torch.float32) if centre is not None else None

    def encode(x: torch.Tensor) -> torch.Tensor:
        e = net(x)
        return e - centre_t if centre_t is not None else e

    terms = [edge_term(targets.masks[o], e, settings.weight_edges) for o, e in targets.edges.items()]
    terms += [embedding_term(encode, targets.masks.get(o), e,
                             settings.weight_embedding * release_reliability(e.shape[1], payload.releases[o].noise_std))
              for o, e in targets.embeddings.items()]
    anchors = class_anchors(payload, population_prototypes)
    inversion = InversionSettings(
        steps=settings.steps, lr=settings.lr, weight_statistics=settings.weight_statistics if stats else 0.0,
        weight_class=settings.weight_class if anchors is not None else 0.0, weight_tv=settings.weight_tv,
        weight_l2=settings.weight_l2, temperature=settings.temperature, jitter=settings.jitter,
        init_scale=settings.init_scale,
        extra_terms=terms, project=segment_projection(targets))
    images, summary = invert(net, targets.labels, payload.image_shape, inversion, seed, stats=stats,
                             anchors=anchors, centre=centre, progress=progress)
    summary["terms"] = {"edges": sorted(targets.edges), "segments": sorted(targets.segments),
                        "embeddings": sorted(targets.embeddings), "class_anchors": anchors is not None,
                        "statistics": stats is not None}
    return images, targets, summary
