"""A user's own data and model, as in the report that opened issue 20: 32x32 RGB images stored
channels-last (uint8, N x 32 x 32 x 3) with user ids, and backbones from timm's registry, BatchNorm ones
among them (the report used resnet18; resnet10t is the same family, smaller)."""


import numpy as np
import pytest


FAMILIES = {  # one per architecture family a user is likely to pick, the smallest of each
    "resnet": "resnet10t", "efficientnet": "efficientnet_b0", "mobilenet": "mobilenetv3_small_050",
    "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224"}


def rgb_users(path, users=12, per_user=4, seed=0):
    rng = np.random.default_rng(seed)
    n = users * per_user
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 4, n),
             user=np.repeat(np.arange(users), per_user))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_backbone_family_trains_under_dp_with_nothing_outside_the_clipped_update(tmp_path, family):
    """2 DP rounds on 32x32 RGB: the model holds no BatchNorm (so no statistics learnt from a client's
    data), and what a client sends is exactly the shared parameters: no buffer rides outside the clip."""
    import torch

    from fedemb.config import load_config, to_toml
    from fedemb.models.embedding_net import has_batchnorm
    from fedemb.protocol import UPDATE
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    rgb_users(tmp_path / "rgb.npz")
    cfg = load_config(None, ['data.name="npz"', f'data.path="{tmp_path / "rgb.npz"}"', f'model.name="{FAMILIES[family]}"',
                             "model.embedding_dim=16", "run.rounds=2", "run.seed=0", "run.eval_every=0",
                             "sampling.rate=0.5", "sampling.users_per_client=1", "client.epochs=1",
                             "data.eval_users=0.25", "privacy.enabled=true"])
    replies = []

    def recording_train(msg, context):
        reply = train(msg, context)
        replies.append({k: reply.content[UPDATE][k].numpy() for k in reply.content[UPDATE].keys()})
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(cfg))
    results = run_federated(InProcessGrid(recording_train, 2), cfg, run_dir, show_progress=False)
    assert results["rounds_completed"] == 2 and results["diverged"] is None and "warnings" not in results
    assert list((run_dir / "tensorboard").rglob("projector_config.pbtxt"))  # the projector took the RGB images
    from fedemb.run_setup import prepare_run

    net = prepare_run(cfg).net
    assert not has_batchnorm(net) and not list(net.backbone.buffers())
    shared = set(torch.load(run_dir / "checkpoints" / "final.pt"))
    params = {name for name, _ in net.named_parameters() if not name.startswith("head")}
    assert shared == params  # the released model is the shared parameters and nothing else
    assert replies and all(set(r) == shared for r in replies)
