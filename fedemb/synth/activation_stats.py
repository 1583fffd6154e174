"""Per-layer, per-channel activation statistics of the private data: what statistics inversion matches.

BatchNorm keeps such statistics as running buffers; our models use GroupNorm (or none), and buffers
computed on private data outside the clipped update would leak. So the statistics are a DP release of
their own. For every example i and watched layer, m_i is the spatial mean of each channel's activation
and s_i the spatial mean of its square (a Linear layer's features are channels of one pixel). Per
example and layer l, m_i is clamped to [-a_l, a_l] and s_i to [0, a_l²], with a_l = `clip` times the
layer's RMS activation on uniform noise images: a scale read off the released model alone, so the
bound is data-independent and one `clip` suits layers and models of any scale. Over the C_l channels
of every layer, ‖m_i‖₂ ≤ (Σ_l C_l a_l²)^½ =: M and ‖s_i‖₂ ≤ (Σ_l C_l a_l⁴)^½ =: S. Every row of user u
weighs w_u = min(1, B / n_u), so a user's rows weigh at most B in all, and removing the user changes

- the count   Σ w           by at most B
- the sums    Σ w m_i       by at most B M
- the squares Σ w s_i       by at most B S

(fedemb.synth.contribution bounds the same way, with one cell). The three noisy sums give each
channel's mean Σwm/Σw and variance Σws/Σw − mean², as BatchNorm defines them over (N, H, W).

A model that keeps BatchNorm inside the clipped DP update (`model.batchnorm_in_update`) already holds
such statistics in its buffers: `batchnorm_statistics` reads those instead, at no extra privacy cost.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedemb.data.population import Population
from fedemb.errors import ConfigError
from fedemb.models.embedding_net import _BATCHNORM
from fedemb.privacy.release import LedgerStage
from fedemb.synth.budget import split_noise_multiplier
from fedemb.synth.contribution import user_weights

VARIANCE_FLOOR = 1e-4


INPUT = "input"  # the model's input image as a watched layer: per-channel pixel statistics


def layer_names(spec: str) -> list[str]:
    """The names in an `invert.layers` spec (comma-separated)."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def named_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Every module of `net` by name, and `input`: the layers statistics can name."""
    return dict(net.named_modules()) | {INPUT: net}


def watched_layers(net: nn.Module, spec: str) -> dict[str, nn.Module]:
    """A comma-separated list of: `input` (the model's input pixels), `conv` (every Conv2d: the input
    of the normalisation BatchNorm would have), or module names of `net`."""
    modules = named_layers(net)
    names = layer_names(spec)
    if not names:
        raise ConfigError("invert.layers is empty: name 'input', 'conv' or module names")
    chosen: dict[str, nn.Module] = {}
    for name in names:
        if name == "conv":
            convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
            if not convs:
                raise ConfigError("invert.layers names 'conv' but the model has no Conv2d layer; name its layers "
                                  "instead")
            chosen.update(convs)
        elif name in modules and name:
            chosen[name] = modules[name]
        else:
            raise ConfigError(f"invert.layers: no module named {name!r} in the model "
                              f"(for example {', '.join(list(modules)[1:4])})")
    return chosen


@contextmanager
def recorded_outputs(layers: dict[str, nn.Module], inputs: bool = False):
    """Collects each layer's output (or input) of the forward passes run inside the block; the `input`
    layer is always the model's input."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        if inputs or name == INPUT:
            return lambda module, args: seen.__setitem__(name, args[0])
        return lambda module, args, output: seen.__setitem__(name, output)

    handles = [(m.register_forward_pre_hook if inputs or n == INPUT else m.register_forward_hook)(hook(n))
               for n, m in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def channel_moments(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example and channel: the spatial mean of a and of a². (n, C, ...) -> two (n, C)."""
    a = activation.flatten(2) if activation.dim() > 2 else activation.unsqueeze(2)
    return a.mean(2), (a * a).mean(2)


@dataclass
class ActivationStatistics:
    layers: list[str]
    means: list[np.ndarray]  # per layer (C_l,)
    variances: list[np.ndarray]  # per layer (C_l,), at least VARIANCE_FLOOR
    source: str  # "dp" or "batchnorm"
    use_inputs: bool = False  # statistics of each layer's input (BatchNorm) rather than its output

    def save(self, path) -> None:
        np.savez(path, layers=np.array(self.layers), source=np.array(self.source), use_inputs=self.use_inputs,
                 **{f"mean_{i}": m for i, m in enumerate(self.means)},
                 **{f"var_{i}": v for i, v in enumerate(self.variances)})

    @classmethod
    def load(cls, path) -> "ActivationStatistics":
        with np.load(path) as f:
            layers = [str(n) for n in f["layers"]]
            return cls(layers, [f[f"mean_{i}"] for i in range(len(layers))],
                       [f[f"var_{i}"] for i in range(len(layers))], str(f["source"]), bool(f["use_inputs"]))


@torch.no_grad()
def per_example_moments(net: nn.Module, layers: dict[str, nn.Module], pop: Population,
                        batch_size: int = 512) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(n, ΣC) channel means and mean squares of every example, and the channel count of each layer."""
    was_training = net.training
    net.eval()
    means, squares, channels = [], [], []
    with recorded_outputs(layers) as seen:
        for start in range(0, len(pop), batch_size):
            net(pop.tensor(np.arange(start, min(start + batch_size, len(pop)))))
            moments = [channel_moments(seen[name]) for name in layers]
            channels = [m.shape[1] for m, _ in moments]
            means.append(torch.cat([m for m, _ in moments], 1).double().numpy())
            squares.append(torch.cat([s for _, s in moments], 1).double().numpy())
    net.train(was_training)
    return np.concatenate(means), np.concatenate(squares), channels


@torch.no_grad()
def reference_scales(net: nn.Module, layers: dict[str, nn.Module], image_shape: tuple[int, int, int],
                     samples: int = 256) -> np.ndarray:
    """Each layer's RMS activation on uniform noise images in [-1, 1]: from the model alone, no data."""
    was_training = net.training
    net.eval()
    noise = torch.rand((samples, *image_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with recorded_outputs(layers) as seen:
        net(noise)
        scales = [float(channel_moments(seen[name])[1].mean().sqrt()) for name in layers]
    net.train(was_training)
    return np.maximum(np.asarray(scales), 1e-6)


def statistics_sensitivities(bound: float, clips: np.ndarray, channels: list[int]) -> dict[str, float]:
    c = np.asarray(channels, dtype=np.float64)
    return {"count": bound, "means": bound * math.sqrt(float((c * clips**2).sum())),
            "squares": bound * math.sqrt(float((c * clips**4).sum()))}


def bounded_sums(m: np.ndarray, s: np.ndarray, users: np.ndarray, per_channel_clip: np.ndarray, bound: float
                 ) -> dict[str, np.ndarray]:
    """The exact count, sums and squares after clamping and user weighting: what the noise is added to."""
    m = np.clip(m, -per_channel_clip, per_channel_clip)
    s = np.clip(s, 0.0, per_channel_clip**2)
    weights = user_weights(users, np.zeros(len(users), dtype=np.int64), 1, bound)
    return {"count": np.array([weights.sum()]), "means": weights @ m, "squares": weights @ s}


def release_activation_statistics(net: nn.Module, layer_spec: str, pop: Population, clip: float, bound: float,
                                  z: float, shares: dict[str, float], stage: LedgerStage) -> ActivationStatistics:
    """The DP release described above, into `stage` (each entry written before its noise). `shares`
    splits the noise multiplier z over count, means and squares (fedemb.synth.budget)."""
    if len(pop) == 0:
        raise ConfigError("no private examples to compute activation statistics on")
    layers = watched_layers(net, layer_spec)
    clips = clip * reference_scales(net, layers, pop.image_shape)
    m, s, channels = per_example_moments(net, layers, pop)
    exact = bounded_sums(m, s, np.asarray(pop.users), np.repeat(clips, channels), bound)
    sensitivity = statistics_sensitivities(bound, clips, channels)
    noisy = {}
    details = {"layers": list(layers), "channels": [int(c) for c in channels], "clips": [float(a) for a in clips],
               "bound": bound}
    for name, z_i in split_noise_multiplier(z, shares).items():
        noisy[name] = stage.gaussian(f"activation {name}", exact[name], z_i, sensitivity[name],
                                     f"Gaussian noise on the activation {name}", details)
    count = max(float(noisy["count"][0]), 1.0)
    mean = noisy["means"] / count
    variance = np.maximum(noisy["squares"] / count - mean**2, VARIANCE_FLOOR)
    edges = np.cumsum([0] + channels)
    return ActivationStatistics(list(layers), [mean[a:b].astype(np.float32) for a, b in zip(edges, edges[1:])],
                                [variance[a:b].astype(np.float32) for a, b in zip(edges, edges[1:])], "dp")


def batchnorm_statistics(net: nn.Module) -> ActivationStatistics:
    """The running statistics of every BatchNorm layer: statistics of that layer's input."""
    norms = {n: m for n, m in net.named_modules() if isinstance(m, _BATCHNORM) and m.running_mean is not None}
    if not norms:
        raise ConfigError("invert.statistics = 'batchnorm' but the model has no BatchNorm running statistics")
    return ActivationStatistics(list(norms), [m.running_mean.detach().float().numpy().copy() for m in norms.values()],
                                [np.maximum(m.running_var.detach().float().numpy(), VARIANCE_FLOOR)
                                 for m in norms.values()], "batchnorm", use_inputs=True)
