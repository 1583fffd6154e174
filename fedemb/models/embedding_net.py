"""backbone -> embedding layer: the part of the model that is trained federatedly and shared.

The classification head is not part of it: clients make a fresh one every round and keep it. The one
exception is the DP-FedAvg baseline (client.head = "shared"): there a classifier over all classes is
part of the model, aggregated and noised with everything else.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

import fedemb.models.lenet  # noqa: F401  (registers fedemb_lenet in timm)
from fedemb.errors import ConfigError

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


class EmbeddingNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, shared_classes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.embedding = nn.Linear(feature_dim, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, shared_classes, bias=False) if shared_classes else None
        self.update_keys: tuple[str, ...] = tuple(shared_state(self))  # what a client's update covers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.backbone(x).flatten(1))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


def create_backbone(name: str, in_chans: int, norm: str, pretrained_file: str = "",
                    img_size: tuple[int, int] | None = None) -> nn.Module:
    """A timm backbone for `in_chans` channels; architectures with a fixed input size (ViT and other
    patch models) are built for `img_size`, the data's (H, W)."""
    if not timm.is_model(name):
        raise ConfigError(f"model.name {name!r} is not a timm model (see timm.list_models(); "
                          "fedemb adds 'fedemb_lenet')")
    kwargs = {"num_classes": 0, "in_chans": in_chans}
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise ConfigError(f"model.pretrained_file not found: {pretrained_file}")
        # timm drops the checkpoint's classifier when the architecture's default class count is not 0
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        backbone = _create(name, bool(pretrained_file), kwargs, img_size)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build model {name!r}: {exc}") from None
    if norm == "group" and has_batchnorm(backbone):
        backbone = to_group_norm(backbone)
    elif norm == "affine":
        _replace_batchnorm(backbone, _as_channel_affine)
    return backbone


def _create(name: str, pretrained: bool, kwargs: dict, img_size: tuple[int, int] | None) -> nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=tuple(img_size), **kwargs)
        except TypeError as exc:  # convolutional families take any size and no img_size argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def to_group_norm(backbone: nn.Module) -> nn.Module:
    """BatchNorm -> GroupNorm with Opacus's ModuleValidator.fix, then timm's BatchNormAct2d (which it
    leaves). A device's lean install has no Opacus: there the same GroupNorm is made directly, and
    tests/test_models.py checks that both give the same model."""
    try:
        from opacus.validators import ModuleValidator
    except ModuleNotFoundError:
        _replace_batchnorm(backbone, _as_group_norm)
        return backbone
    backbone = ModuleValidator.fix(backbone)
    _replace_batchnorm(backbone, _as_group_norm)
    return backbone


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel: what a BatchNorm computes in eval mode, with its statistics folded
    into trainable parameters. Keeps a pretrained BatchNorm's function without learning from batch
    statistics, which would leave a client outside its clipped update."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def _as_group_norm(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    return nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, affine=bn.affine)


def _as_channel_affine(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        scale = torch.rsqrt(var + bn.eps)
        shift = -mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return ChannelAffine(scale, shift)


def _replace_batchnorm(module: nn.Module, replacement) -> None:
    """Every BatchNorm (torch's and subclasses such as timm's BatchNormAct2d, which adds its own dropout
    and activation) becomes `replacement(bn)` followed by the same dropout and activation."""
    for name, child in module.named_children():
        if isinstance(child, _BATCHNORM):
            norm = replacement(child)
            extra = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
            setattr(module, name, nn.Sequential(norm, *extra) if extra else norm)
        else:
            _replace_batchnorm(child, replacement)


def build_embedding_net(model_cfg, image_shape: tuple[int, int, int], dp_enabled: bool,
                        shared_classes: int = 0) -> EmbeddingNet:
    """`shared_classes` > 0: with a shared classifier over that many classes (client.head = "shared")."""
    backbone = create_backbone(model_cfg.name, image_shape[0], model_cfg.norm, model_cfg.pretrained_file,
                               tuple(image_shape[1:]))
    if dp_enabled and has_batchnorm(backbone) and not model_cfg.batchnorm_in_update:
        raise ConfigError(
            f"model {model_cfg.name!r} keeps BatchNorm, whose running statistics would leave clients "
            "outside the clipped update; use model.norm = 'group', or set model.batchnorm_in_update = true "
            "to send them inside it")
    with torch.no_grad():
        backbone.eval()
        feature_dim = backbone(torch.zeros(2, *image_shape)).flatten(1).shape[1]
        backbone.train()
    net = EmbeddingNet(backbone, feature_dim, model_cfg.embedding_dim, shared_classes)
    if model_cfg.init_checkpoint:
        load_checkpoint(net, model_cfg.init_checkpoint)
    freeze_all_but(net, model_cfg.train_only)
    return net


def update_keys(keys, train_only) -> list[str]:
    """The model-state keys a virtual client's update covers: all of `keys`, or those under the module
    paths or parameter names of model.train_only (and a shared classifier's, which has no other way to
    train)."""
    keys = list(keys)
    if not train_only:
        return keys
    for prefix in train_only:
        if not any(_under(k, prefix) for k in keys):
            tops = sorted({k.rsplit(".", 2)[0] for k in keys})
            raise ConfigError(f"model.train_only: {prefix!r} names no parameter of this model "
                              f"(module paths look like: {', '.join(tops[-4:])})")
    return [k for k in keys if k.startswith(SHARED_CLASSIFIER) or any(_under(k, p) for p in train_only)]


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def freeze_all_but(net: EmbeddingNet, train_only) -> None:
    """Parameters outside model.train_only keep their initial (pretrained) values: no gradient, and
    no part of any update, clipping, noise or server step."""
    net.update_keys = tuple(update_keys(shared_state(net), train_only))
    kept = set(net.update_keys)
    for name, param in net.named_parameters():
        param.requires_grad_(name in kept)


def update_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The part of shared_state that clients train and send back (model.train_only; all by default)."""
    keys = set(getattr(net, "update_keys", ()) or shared_state(net))
    return {k: v for k, v in shared_state(net).items() if k in keys}


SHARED_CLASSIFIER = "classifier."  # a checkpoint without it (public pretraining) starts it fresh


def shared_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Everything of the embedding net that leaves a client: all floating-point parameters and buffers.
    Integer buffers (BatchNorm's step counter) carry no data and stay where they are."""
    return {k: v for k, v in net.state_dict().items() if v.is_floating_point()}


def load_checkpoint(net: nn.Module, path: str | Path) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {p}: {exc}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {p} does not fit the model: {str(exc).splitlines()[0]}") from None
    missing = {k for k in set(shared_state(net)) - set(state) if not k.startswith(SHARED_CLASSIFIER)}
    if missing:
        raise ConfigError(f"checkpoint {p} lacks {len(missing)} tensors of the model, e.g. {sorted(missing)[0]}")
