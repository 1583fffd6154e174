"""Where a node trains (client.device): its CPUs, or its CUDA device when it has one it may use. The
update leaves the device before it is clipped, so clipping, the sum and the reply are the same code
either way. The CUDA tests run only where torch sees a GPU (scripts/benchmark_scale.py --device cuda
is the GPU check); the rest hold on any machine."""

import pytest
import torch

from fedemb.errors import ConfigError
from fedemb.run_setup import prepare_run
from fedemb.training.client_task import training_device
from fedemb.training.local import LocalTrainingConfig, train_virtual_client
from fedemb.training.vectorized import train_virtual_clients
from tests.helpers import tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def local_config(**kw):
    base = dict(epochs=1, batch_size=4, max_examples=20, lr=0.05, momentum=0.9, head_lr_scale=10.0, num_classes=10)
    return LocalTrainingConfig(**(base | kw))


def test_auto_uses_cuda_only_where_there_is_one_and_cuda_refuses_to_run_without(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == "cpu" and training_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="client.device = 'cuda' but this node has no CUDA device"):
        training_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device("auto") == "cuda" and training_device("cuda") == "cuda"
    assert training_device("cpu") == "cpu"


def test_a_bad_device_name_is_refused_in_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"client\.device must be one of auto, cpu, cuda; got 'gpu'"):
        tiny_config('client.device="gpu"')


def cpu_and_cuda_results(vectorize: int):
    s = prepare_run(tiny_config())
    net, pop = s.net, s.splits.train
    users = [int(u) for u in pop.user_ids[:6]]
    clients, seeds, cfg = [tuple(users[:2]), tuple(users[2:4]), tuple(users[4:])], [5, 6, 7], local_config()
    initial = {k: v.clone() for k, v in net.state_dict().items()}

    def train(device):
        net.to(device).load_state_dict(initial)
        if vectorize:
            return list(train_virtual_clients(net, pop, clients, cfg, seeds, None, group_size=vectorize))
        return [train_virtual_client(net, pop, c, cfg, seed) for c, seed in zip(clients, seeds)]

    on_cpu = train("cpu")
    on_cuda = train("cuda")
    net.to("cpu")
    return on_cpu, on_cuda


@needs_cuda
@pytest.mark.parametrize("vectorize", [0, 3])
def test_training_on_the_gpu_gives_what_the_cpu_gives_and_returns_it_on_the_cpu(vectorize):
    on_cpu, on_cuda = cpu_and_cuda_results(vectorize)
    for c, g in zip(on_cpu, on_cuda):
        assert g.num_examples == c.num_examples and g.mean_loss == pytest.approx(c.mean_loss, rel=1e-3)
        for k in c.delta:
            assert g.delta[k].device.type == "cpu"
            torch.testing.assert_close(g.delta[k], c.delta[k], rtol=1e-3, atol=1e-5)
