"""A device without Opacus builds the same GroupNorm model as the server, which converts with Opacus's
ModuleValidator.fix: otherwise its replies would not fit the shared model."""

import builtins

import pytest
import timm
import torch

from fedemb.models.embedding_net import has_batchnorm, to_group_norm


def _without_opacus(monkeypatch):
    real_import = builtins.__import__

    def deny(name, *args, **kwargs):
        if name.split(".")[0] == "opacus":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", deny)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_group_norm_without_opacus_is_the_model_opacus_makes(name, monkeypatch):
    torch.manual_seed(0)
    with_opacus = to_group_norm(timm.create_model(name, num_classes=0, in_chans=1))
    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=0, in_chans=1)
    _without_opacus(monkeypatch)
    lean = to_group_norm(backbone)
    assert not has_batchnorm(with_opacus) and not has_batchnorm(lean)
    assert repr(lean) == repr(with_opacus)
    ours, theirs = lean.state_dict(), with_opacus.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(lean.eval()(x), with_opacus.eval()(x))
