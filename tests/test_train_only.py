"""model.train_only: the frozen part keeps its initial values end to end; client updates, clipping,
noise and the server step cover only the trained part; a name that matches nothing is refused."""

import pytest
import torch

from fedemb.config import load_config
from fedemb.errors import ConfigError
from fedemb.models.embedding_net import build_embedding_net, shared_state, update_keys, update_state
from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.mechanisms import SampledGaussian
from fedemb.privacy.noise import GaussianNoise
from fedemb.run_setup import prepare_run
from fedemb.training.local import LocalTrainingConfig, train_virtual_client
from fedemb.training.vectorized import train_virtual_clients
from strategies.server_optimizer import make_server_optimizer
from tests.helpers import SMALL_RUN, tiny_config


def test_update_keys_follow_module_paths_not_string_prefixes():
    keys = ["backbone.blocks.6.w", "backbone.blocks.60.w", "embedding.weight", "embedding.bias"]
    assert update_keys(keys, []) == keys
    assert update_keys(keys, ["backbone.blocks.6", "embedding"]) == ["backbone.blocks.6.w", "embedding.weight",
                                                                     "embedding.bias"]
    assert update_keys(keys, ["embedding.bias"]) == ["embedding.bias"]
    with pytest.raises(ConfigError, match="model.train_only: 'backbone.block'"):
        update_keys(keys, ["backbone.block"])


def test_the_frozen_backbone_has_no_gradient_and_stays_out_of_the_update():
    cfg = tiny_config("model.train_only=['embedding']", "client.head=global")
    s = prepare_run(cfg)
    net, pop = s.net, s.splits.train
    assert set(net.update_keys) == set(update_state(net)) == {"embedding.weight", "embedding.bias"}
    assert not any(p.requires_grad for n, p in net.named_parameters() if n.startswith("backbone."))
    before = {k: v.clone() for k, v in shared_state(net).items()}
    local = LocalTrainingConfig(**cfg.client.model_dump(), num_classes=10)
    result = train_virtual_client(net, pop, tuple(pop.user_ids[:3]), local, seed=1)
    assert set(result.delta) == {"embedding.weight", "embedding.bias"}
    assert result.delta["embedding.weight"].abs().max() > 0
    after = shared_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


def test_vectorized_training_of_a_partly_frozen_model_trains_one_by_one_with_the_same_results(caplog):
    cfg = tiny_config("model.train_only=['embedding', 'backbone.features.3']", "client.head=global")
    s = prepare_run(cfg)
    net, pop = s.net, s.splits.train
    local = LocalTrainingConfig(**cfg.client.model_dump(), num_classes=10)
    clients = [tuple(pop.user_ids[i:i + 2]) for i in range(0, 6, 2)]
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level("WARNING", logger="fedemb"):
        got = list(train_virtual_clients(net, pop, clients, local, [1, 2, 3], None, group_size=4))
    assert "model.train_only freezes part of the model" in caplog.text
    for users, seed, g in zip(clients, [1, 2, 3], got):
        net.load_state_dict(initial)
        expected = train_virtual_client(net, pop, users, local, seed)
        assert set(g.delta) == set(net.update_keys)
        for k in g.delta:
            torch.testing.assert_close(g.delta[k], expected.delta[k])


def test_the_server_steps_and_noises_only_the_trained_part():
    cfg = tiny_config("model.train_only=['embedding']", "server.noise_step_limit=1.0")
    s = prepare_run(cfg)
    state = shared_state(s.net)
    plan = PrivacyPlan("rdp", 0.2, 1.0, 1.0, 1.0, 1e-5, 0.0)
    mech = SampledGaussian(plan, cfg.privacy.clip_norm, GaussianNoise(0.0, seed=0), 10)
    opt = make_server_optimizer(cfg, state, mech, 10)
    assert opt.update_keys == s.net.update_keys
    d = sum(state[k].numel() for k in opt.update_keys)  # the noise ratio counts the trained parameters only
    assert opt.lr == pytest.approx(min(cfg.server.lr, 1.0 / (1.0 * d ** 0.5 / 10)))
    new = opt.step({k: torch.ones_like(state[k]) for k in opt.update_keys})
    assert all(torch.equal(new[k], state[k]) for k in state if k not in opt.update_keys)
    assert all(not torch.equal(new[k], state[k]) for k in opt.update_keys)


def test_a_federated_run_leaves_the_frozen_backbone_exactly_as_it_started(tmp_path):
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    cfg = load_config(None, SMALL_RUN + ["model.train_only=['embedding', 'backbone.features.3']"])
    initial = shared_state(prepare_run(cfg).net)
    run_federated(InProcessGrid(train, 2), cfg, tmp_path / "run", show_progress=False)
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    final = final.get("state_dict", final)
    moved = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert moved and all(k.startswith(("embedding.", "backbone.features.3.")) for k in moved)


def test_a_train_only_name_that_matches_nothing_is_a_config_error():
    cfg = tiny_config("model.train_only=['backbone.nonexistent']")
    with pytest.raises(ConfigError, match="names no parameter"):
        build_embedding_net(cfg.model, (1, 8, 8), dp_enabled=True)
