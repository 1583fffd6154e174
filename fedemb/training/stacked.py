"""A net's forward for a group of N clients at once, each with its own weights, without vmap.

The group's examples form one batch laid out example-major: row b·N + n is example b of client n.
Layers without parameters (activations, pooling, flatten, reshapes) act on each row alone, so they run
unchanged on the whole batch. Each layer with parameters is given the group's weights stacked,
(N, *shape), and applies every client's own:

- a convolution is one grouped convolution over the N clients: in this layout the batch (B·N, C, H, W)
  *is* (B, N·C, H, W), a view, so no copy is made on the way in or out;
- a linear layer is one batched matmul over the clients;
- GroupNorm is one GroupNorm of N·G groups; LayerNorm and fedemb's ChannelAffine scale per client.

On CPU this is what makes a group cheaper than its clients one by one (docs/performance.md, "Vectorized
training on CPU"): vmap's batching rules reach the same grouped convolution forward, but its backward and
the per-client bookkeeping around it cost more than they save.

A net runs so only if every module that owns parameters is exactly one of the types in STACKED (a
subclass may override forward) and none keeps batch statistics; `unsupported` names the first module
that is not, and the caller falls back to vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fedemb.models.embedding_net import ChannelAffine, has_batchnorm

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _unview(out: torch.Tensor, shape) -> torch.Tensor:
    """`out` (a fresh result nothing else holds) reshaped without autograd recording a view: the next layer
    is often an in-place ReLU, which on a view would make the backward copy the whole activation twice."""
    return torch.ops.aten._unsafe_view(out, shape)


def _conv(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    if m.padding_mode != "zeros":  # what nn.Conv*d._conv_forward does: pad each example, then no padding
        x, padding = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
    else:
        padding = m.padding
    rows, channels, *space = x.shape
    weight = m.weight.reshape(n * m.out_channels, *m.weight.shape[2:])
    bias = None if m.bias is None else m.bias.reshape(-1)
    out = _CONV[type(m)](x.reshape(rows // n, n * channels, *space), weight, bias, m.stride, padding, m.dilation,
                         n * m.groups)
    return _unview(out, (rows, m.out_channels, *out.shape[2:]))


def _linear(m: nn.Linear, x: torch.Tensor, n: int) -> torch.Tensor:
    rows, *middle, features = x.shape
    per_client = x.reshape(rows // n, n, -1, features).transpose(0, 1).reshape(n, -1, features)
    if m.bias is None:
        out = torch.bmm(per_client, m.weight.transpose(1, 2))
    else:
        out = torch.baddbmm(m.bias.unsqueeze(1), per_client, m.weight.transpose(1, 2))
    return out.reshape(n, rows // n, -1, m.out_features).transpose(0, 1).reshape(rows, *middle, m.out_features)


def _group_norm(m: nn.GroupNorm, x: torch.Tensor, n: int) -> torch.Tensor:
    rows, channels, *space = x.shape
    weight = None if m.weight is None else m.weight.reshape(-1)
    bias = None if m.bias is None else m.bias.reshape(-1)
    out = F.group_norm(x.reshape(rows // n, n * channels, *space), n * m.num_groups, weight, bias, m.eps)
    return _unview(out, x.shape)


def _per_client(value: torch.Tensor, n: int, ndim: int, axis: int) -> torch.Tensor:
    """`value` (N, *shape) shaped to broadcast against a (B·N, ...) tensor of `ndim` dimensions viewed as
    (B, N, ...), with `shape` at the tensor's dimension `axis`."""
    trailing = ndim - axis - (value.dim() - 1)
    return value.reshape(1, n, *([1] * (axis - 1)), *value.shape[1:], *([1] * trailing))


def _scale_shift(x: torch.Tensor, n: int, scale, shift, axis: int) -> torch.Tensor:
    out = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    if scale is not None:
        out = out * _per_client(scale, n, x.dim(), axis)
    if shift is not None:
        out = out + _per_client(shift, n, x.dim(), axis)
    return _unview(out, x.shape)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor, n: int) -> torch.Tensor:
    out = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _scale_shift(out, n, m.weight, m.bias, x.dim() - len(m.normalized_shape))


def _channel_affine(m: ChannelAffine, x: torch.Tensor, n: int) -> torch.Tensor:
    return _scale_shift(x, n, m.scale, m.shift, 1)


STACKED: dict[type, Callable[[nn.Module, torch.Tensor, int], torch.Tensor]] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.Linear: _linear, nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm, ChannelAffine: _channel_affine,
}


def unsupported(net: nn.Module) -> str:
    """Why `net` cannot run stacked ("" when it can)."""
    if has_batchnorm(net):
        return "BatchNorm mixes the examples of a batch"
    for name, m in net.named_modules():
        if "forward" in vars(m):
            return f"module {name or type(m).__name__} has its own forward attribute"
        if any(p is not None for p in m._parameters.values()) and type(m) not in STACKED:
            return f"module {name or 'net'} ({type(m).__name__}) owns parameters and has no stacked forward"
    return ""


@contextmanager
def stacked(net: nn.Module, n: int) -> Iterator[None]:
    """Within it, `functional_call(net, stacked_params, x)` runs N clients' weights (N, *shape) on a batch laid
    out example-major. The weights must be given through functional_call: a module that read another's
    weight directly would then see the stacked tensor and fail, where it would silently see one client's."""
    patched = [m for m in net.modules() if type(m) in STACKED]
    try:
        for m in patched:
            m.forward = partial(STACKED[type(m)], m, n=n)
        yield
    finally:
        for m in patched:
            vars(m).pop("forward", None)
