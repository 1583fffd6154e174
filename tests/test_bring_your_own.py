"""A user's own data and model, as in the report that opened issue 20: 32x32 RGB images stored
channels-last (uint8, N x 32 x 32 x 3) with user ids, and a BatchNorm backbone from timm's registry."""

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_a_channels_last_rgb_npz_with_a_batchnorm_backbone_trains_and_writes_everything(tmp_path):
    from fedemb.config import load_config, to_toml
    from fedemb.federated import run_federated
    from fedemb.inprocess import InProcessGrid
    from simulations.client_app import train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (240, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=rng.integers(0, 5, 240), user=np.repeat(np.arange(24), 10))
    cfg = load_config(None, ['data.name="npz"', f'data.path="{tmp_path / "rgb.npz"}"', 'model.name="resnet18"',
                             "run.rounds=2", "run.seed=0", "sampling.rate=0.5", "sampling.users_per_client=2",
                             "client.epochs=1", "data.eval_users=0.25"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(cfg))
    results = run_federated(InProcessGrid(train, 2), cfg, run_dir, show_progress=False)
    written = json.loads((run_dir / "results.json").read_text())
    assert written["rounds_completed"] == 2 and "warnings" not in written and results["final"]["recall_at_1"] >= 0
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    assert list((run_dir / "tensorboard").rglob("projector_config.pbtxt"))  # the projector took the RGB images
    import torch

    final = torch.load(run_dir / "checkpoints" / "final.pt")
    assert final["backbone.conv1.weight"].shape[1] == 3  # three input channels, from the data
