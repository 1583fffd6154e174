"""Statistics inversion: optimise a batch of images, from noise, so that the model sees in them the
released activation statistics and the wanted class.

The loss, on the batch x (model input scale, [-1, 1]):

- statistics: Σ over watched layers of ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂, the batch's per-channel
  mean and variance against the released ones (the whole batch, all classes, like the private data);
- class: cross-entropy of softmax(cos(e(x), p_c) / T) over class anchors p_c (DP class prototypes, or
  a user's shared references), so every image moves toward its own class;
- embedding: 1 − cos(e(x_i), t_i) toward each image's own target embedding t_i (samples of a DP
  mixture: embedding-guided inversion), so the images of a class spread as the class's embeddings do;
- priors: total variation and the squared L2 norm of the image;
- `extra_terms`: callables on the un-jittered batch, for pixel-aligned targets (customized synthesis);
  `project` puts back, after every step, pixels that are known exactly (shared segments).

Every step sees the batch under a random shift of up to `jitter` pixels (and a random horizontal flip
when enabled), so the images do not overfit one alignment. Adam with a cosine schedule; the iterate of
lowest loss, evaluated without jitter, is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedemb.config import InvertConfig
from fedemb.synth.activation_stats import ActivationStatistics, channel_moments, named_layers, recorded_outputs

_INVERT = InvertConfig()  # the one home of the defaults: `fedemb synth invert`'s settings

EVALUATE_EVERY = 25


@dataclass
class InversionSettings:
    steps: int = _INVERT.steps
    lr: float = _INVERT.lr
    weight_statistics: float = _INVERT.weight_statistics
    weight_class: float = _INVERT.weight_class
    weight_tv: float = _INVERT.weight_tv
    weight_l2: float = _INVERT.weight_l2
    temperature: float = _INVERT.temperature
    weight_embedding: float = _INVERT.weight_embedding
    jitter: int = _INVERT.jitter
    flip: bool = _INVERT.flip
    init_scale: float = 0.5  # std of the starting noise (model scale, [-1, 1]); custom synthesis sets its own
    extra_terms: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    project: Callable[[torch.Tensor], None] | None = None  # in place, after every step: fixed pixels


class StatisticsTarget:
    """The released statistics, and the watched layers' batch statistics of the last forward pass."""

    def __init__(self, net: nn.Module, stats: ActivationStatistics):
        modules = named_layers(net)
        missing = [n for n in stats.layers if n not in modules]
        if missing:
            raise ValueError(f"the statistics name layer {missing[0]!r}, which the model does not have")
        self.layers = {n: modules[n] for n in stats.layers}
        self.use_inputs = stats.use_inputs
        self.means = [torch.as_tensor(m, dtype=torch.float32) for m in stats.means]
        self.variances = [torch.as_tensor(v, dtype=torch.float32) for v in stats.variances]

    def loss(self, seen: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for name, mean, var in zip(self.layers, self.means, self.variances):
            m, s = channel_moments(seen[name])
            batch_mean = m.mean(0)
            batch_var = s.mean(0) - batch_mean**2
            total = total + torch.linalg.vector_norm(batch_mean - mean) + torch.linalg.vector_norm(batch_var - var)
        return total


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def class_loss(embeddings: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor, centre: torch.Tensor | None,
               temperature: float) -> torch.Tensor:
    e = embeddings - centre if centre is not None else embeddings
    logits = F.normalize(e, dim=1) @ anchors.T / temperature
    return F.cross_entropy(logits, labels)


def embedding_loss(embeddings: torch.Tensor, targets: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
    e = embeddings - centre if centre is not None else embeddings
    return (1 - (F.normalize(e, dim=1) * targets).sum(1)).mean()


def jittered(x: torch.Tensor, jitter: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    if jitter > 0:
        dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


def invert(net: nn.Module, labels: np.ndarray, image_shape: tuple[int, int, int], settings: InversionSettings,
           seed: int, stats: ActivationStatistics | None = None, anchors: np.ndarray | None = None,
           centre: np.ndarray | None = None, init: np.ndarray | None = None,
           targets: np.ndarray | None = None,
           progress: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, dict]:
    """Images (n, C, H, W) in [0, 1] for `labels`, and a summary of the optimisation.

    `init` (n, C, H, W) in [0, 1] replaces the noise start; `anchors` (classes, d) unit rows enable the
    class term; `stats` the statistics term; `targets` (n, d) unit rows the embedding term, which pulls
    each image's (centred, normalised) embedding toward its own target by cosine."""
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    target = StatisticsTarget(net, stats) if stats is not None and settings.weight_statistics > 0 else None
    y = torch.as_tensor(labels, dtype=torch.int64)
    anchor_t = torch.as_tensor(anchors, dtype=torch.float32) if anchors is not None else None
    centre_t = torch.as_tensor(centre, dtype=torch.float32) if centre is not None else None
    target_t = torch.as_tensor(targets, dtype=torch.float32) if targets is not None else None
    if init is not None:
        start = torch.as_tensor(init, dtype=torch.float32) * 2 - 1
    else:
        start = settings.init_scale * torch.randn((len(labels), *image_shape), generator=gen)
    x = start.clone().clamp_(-1, 1)
    if settings.project is not None:
        settings.project(x)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(settings.steps, 1))))
    layers = target.layers if target is not None else {}
    inputs = target.use_inputs if target is not None else False

    def objective(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with recorded_outputs(layers, inputs=inputs) as seen:
            emb = net(batch)
        parts = {}
        if target is not None:
            parts["statistics"] = settings.weight_statistics * target.loss(seen)
        if anchor_t is not None and settings.weight_class > 0:
            parts["class"] = settings.weight_class * class_loss(emb, anchor_t, y, centre_t, settings.temperature)
        if target_t is not None and settings.weight_embedding > 0:
            parts["embedding"] = settings.weight_embedding * embedding_loss(emb, target_t, centre_t)
        parts["tv"] = settings.weight_tv * total_variation(batch)
        parts["l2"] = settings.weight_l2 * (batch**2).mean()
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    def with_extras(batch: torch.Tensor, total: torch.Tensor, parts: dict[str, float]):
        for i, term in enumerate(settings.extra_terms):
            value = term(batch)
            parts[f"extra_{i}"] = float(value.detach())
            total = total + value
        return total, parts

    best = (math.inf, x.detach().clone(), {})
    for step in range(settings.steps + 1):
        if step % EVALUATE_EVERY == 0 or step == settings.steps:
            with torch.no_grad():
                loss, parts = with_extras(x, *objective(x))
            if float(loss) < best[0]:
                best = (float(loss), x.detach().clone(), dict(parts, step=step))
            if progress is not None:
                progress(step, float(loss))
        if step == settings.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(jittered(x, settings.jitter, settings.flip, gen))
        loss, _ = with_extras(x, loss, {})
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
            if settings.project is not None:
                settings.project(x)
    images = ((best[1] + 1) / 2).clamp(0, 1).numpy().astype(np.float32)
    return images, {"best_loss": best[0], "best": best[2], "steps": settings.steps}
