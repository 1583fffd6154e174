"""Small builders shared by tests (real components, small sizes)."""

from fedemb.config import load_config

TINY = [
    'model.name="fedemb_lenet_small"', "model.embedding_dim=16", "data.num_users=200",
    "sampling.rate=0.5", "sampling.users_per_client=4", "client.epochs=1", "client.batch_size=8",
    "run.seed=0", "run.rounds=3",
]


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))
