"""Small builders shared by tests (real components, small sizes)."""

from fedemb.config import load_config

TINY = [
    'model.name="fedemb_lenet_small"', "model.embedding_dim=16", "data.num_users=200",
    "sampling.rate=0.5", "sampling.users_per_client=4", "client.epochs=1", "client.batch_size=8",
    "run.seed=0", "run.rounds=3",
]


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


SMALL_RUN = ['model.name="fedemb_lenet_small"', "model.embedding_dim=8", "data.num_users=100",
             "sampling.rate=0.3", "sampling.users_per_client=1", "client.epochs=1", "run.rounds=2",
             "run.seed=1", "run.eval_every=0"]


def train_small_run(run_dir):
    """A 2-round DP run on digits (in process), with its config, checkpoints and ledger in run_dir."""
    from fedemb.config import to_toml
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    cfg = load_config(None, SMALL_RUN)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    run_federated(InProcessGrid(train, 2), cfg, run_dir, show_progress=False)
    return run_dir
