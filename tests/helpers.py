"""Small builders shared by tests (real components, small sizes)."""

from fedemb.config import load_config
from fedemb.os_processes import command_line, find, leftovers

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


# --- the CLI, in this process -----------------------------------------------------------------------

def cli(*args, **invoke_options):
    """`fedemb ARGS...` through typer's runner: (exit code, output)."""
    from typer.testing import CliRunner

    from fedemb.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], **invoke_options)
    return result.exit_code, result.output


def sets(items):
    """`--set` before each override."""
    return [arg for item in items for arg in ("--set", item)]


def save_image(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


# --- processes (fedemb.os_processes) ----------------------------------------------------------------

LEFTOVER_PATTERNS = ("raylet", "gcs_server", "ray::", "flower-superlink", "flower-superexec", "flwr-serverapp",
                     "flwr-clientapp", "flwr-simulation",
                     "default_worker.py", "dashboard/agent.py", "log_monitor.py")


def ray_or_flower(argv: list[str]) -> bool:
    """A Ray or Flower process, by its command line."""
    joined = " ".join(argv)
    return any(p in joined for p in LEFTOVER_PATTERNS)


def ray_like_processes() -> set:
    return set(find(ray_or_flower))


def described(processes) -> list[str]:
    return [f"{p.pid} {' '.join(command_line(p))[:120] or '(gone)'}" for p in processes]


def assert_nothing_left(before, timeout: float = 45.0) -> None:
    """No Ray or Flower process but those in `before` still runs after up to `timeout` seconds (Ray's
    actors exit after the driver, slower on a loaded machine)."""
    left = leftovers(ray_or_flower, ignore=before, timeout=timeout)
    assert not left, f"processes left running: {described(left)}"


def die_at_server_step(monkeypatch, n: int):
    """The server process dies (SystemExit) at its n-th model update, as a killed run would; returns the
    honest step, to put back with monkeypatch.setattr(ServerOptimizer, "step", ...)."""
    from strategies.server_optimizer import ServerOptimizer

    honest, steps = ServerOptimizer.step, []

    def dying(self, mean_delta):
        steps.append(1)
        if len(steps) == n:
            raise SystemExit("killed")
        return honest(self, mean_delta)

    monkeypatch.setattr(ServerOptimizer, "step", dying)
    return honest
