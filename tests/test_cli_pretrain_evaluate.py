"""`fedemb pretrain` writes a checkpoint that improves the held-out metrics; `fedemb evaluate` measures it
the same way; a federated run configured with it starts from exactly those weights."""

import json

import torch

from fedemb.config import load_config
from fedemb.data.store import load_splits
from fedemb.models.embedding_net import build_embedding_net, shared_state
from tests.helpers import cli, sets

PUBLIC = ["data.num_users=300", "data.public_users=0.3", "pretrain.epochs=8", "run.seed=0",
          'model.name="fedemb_lenet_small"', "model.embedding_dim=16"]


def test_pretrain_then_evaluate_then_start_from_checkpoint(tmp_path):
    ckpt = tmp_path / "public.pt"
    code, out = cli("pretrain", *sets(PUBLIC), "--out", str(ckpt))
    assert code == 0, out
    assert "recall@1" in out and ckpt.is_file()

    before_code, before = cli("evaluate", *sets(PUBLIC), "--checkpoint", str(tmp_path / "missing.pt"), "--json")
    assert before_code == 2 and "missing.pt" in before  # one line naming the file, no traceback
    assert "Traceback" not in before

    code, out = cli("evaluate", *sets(PUBLIC), "--checkpoint", str(ckpt), "--json")
    assert code == 0, out
    trained = json.loads(out.strip().splitlines()[-1])

    cfg = load_config(None, PUBLIC)
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    untrained = build_embedding_net(cfg.model, splits.eval.image_shape, dp_enabled=False)
    torch.save(shared_state(untrained), tmp_path / "untrained.pt")
    code, out = cli("evaluate", *sets(PUBLIC), "--checkpoint", str(tmp_path / "untrained.pt"), "--json")
    baseline = json.loads(out.strip().splitlines()[-1])
    assert trained["examples"] == baseline["examples"] == len(splits.eval)
    assert trained["recall_at_1"] > baseline["recall_at_1"] + 0.02
    assert trained["tar_at_far_1e-1"] > baseline["tar_at_far_1e-1"]

    start = load_config(None, PUBLIC + [f'model.init_checkpoint="{ckpt}"'])
    net = build_embedding_net(start.model, splits.train.image_shape, dp_enabled=True)
    saved = torch.load(ckpt)
    state = shared_state(net)
    assert set(saved) == set(state)
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value)


def test_pretrain_without_public_users_is_a_one_line_error():
    code, out = cli("pretrain", *sets(["data.num_users=100", "data.public_users=0"]), "--out", "/nonexistent/x.pt")
    assert code == 2 and "public_users" in out and "Traceback" not in out
