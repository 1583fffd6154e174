"""LeNet-style CNNs for small grayscale images, registered in timm's registry as `fedemb_lenet`
(width 32, the reference's) and `fedemb_lenet_small` (width 8).

conv5x5-32, pool, conv5x5-64, pool, flatten: the reference's digit backbone without its dense layer
(the embedding layer on top plays that role). No normalisation layers, so nothing to leak outside DP.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class LeNet(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 0, width: int = 32, **_):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.num_features = 0  # depends on the image size; EmbeddingNet measures it
        self.head = nn.LazyLinear(num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int, *_, **__):
        self.num_classes = num_classes
        self.head = nn.LazyLinear(num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "fedemb_lenet.untrained": {"num_classes": 0, "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,),
                               "classifier": "head", "first_conv": "features.0"},
    "fedemb_lenet_small.untrained": {"num_classes": 0, "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,),
                                     "classifier": "head", "first_conv": "features.0"},
})


@register_model
def fedemb_lenet(pretrained: bool = False, **kwargs) -> LeNet:
    return build_model_with_cfg(LeNet, "fedemb_lenet", pretrained, **kwargs)


@register_model
def fedemb_lenet_small(pretrained: bool = False, **kwargs) -> LeNet:
    """Width 8: a few thousand parameters, for small populations where DP noise scales with sqrt(d)."""
    return build_model_with_cfg(LeNet, "fedemb_lenet_small", pretrained, **dict({"width": 8}, **kwargs))
