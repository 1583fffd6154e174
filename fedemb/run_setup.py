"""What a federated run is, settled before any process starts: its data, initial model and privacy
plan (prepare_run), and, for a resumed run, the state and ledger it continues from (check_resume).

Everything here can fail on bad input and changes nothing, so `fedemb simulate` (fedemb.cli.api) calls it
first and hands the RunSetup to the run driver (simulations.run); a ServerApp that Flower starts on its own
(`flwr run .`, a deployment) prepares its run there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedemb.config import Config
from fedemb.data.splits import DataSplits
from fedemb.data.store import load_splits
from fedemb.errors import ConfigError
from fedemb.models.embedding_net import EmbeddingNet, build_embedding_net
from fedemb.privacy.accountant import PrivacyPlan, make_privacy_plan
from fedemb.privacy.keyed_random import keyed_seed
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.mechanisms import STAGE, make_mechanism
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.sampling import virtual_client_slots
# STREAM_TRAINING_KEY: keyed_seed(secret, STREAM_TRAINING_KEY) is the key the clients' draws use (re-exported)
from fedemb.privacy.streams import STREAM_MODEL_INIT, STREAM_TRAINING_KEY  # noqa: F401
from fedemb.run_dir import LEDGER_FILE, STATE_FILE


@dataclass
class RunSetup:
    cfg: Config
    splits: DataSplits
    net: EmbeddingNet
    virtual_clients: int  # M: slots per round, fixed for the run; the aggregate's denominator
    privacy: PrivacyPlan

    @property
    def on_devices(self) -> bool:
        return self.cfg.deployment.devices > 0

    @property
    def population(self) -> int:
        """N: the training users; on devices, the registered devices (the server holds no training data)."""
        return self.cfg.deployment.devices or self.splits.train.num_users


def prepare_run(cfg: Config) -> RunSetup:
    """Everything that can fail on bad input, checked before any process is started."""
    if cfg.data.name == "procedural" and cfg.sampling.method == "limited":
        raise ConfigError("sampling.method = 'limited' keeps state for every user (O(N) per round); with "
                          "data.name = 'procedural' use 'poisson' or 'fixed'")
    splits = load_splits(cfg.data)
    n_users = cfg.deployment.devices or splits.train.num_users
    k = cfg.sampling.users_per_client
    if k > n_users:
        raise ConfigError(f"sampling.users_per_client = {k} is larger than the {n_users} training users available")
    expected = cfg.sampling.rate * n_users
    if cfg.sampling.users_per_client > 1 and expected < k:
        raise ConfigError(f"sampling.rate = {cfg.sampling.rate} samples {expected:.1f} of {n_users} users per round "
                          f"on average, fewer than sampling.users_per_client = {k}")
    slots = virtual_clients_per_round(cfg, n_users)
    if cfg.run.seed >= 0:
        torch.manual_seed(keyed_seed(cfg.run.seed, STREAM_MODEL_INIT))  # the initial model is data-independent
    net = build_embedding_net(cfg.model, splits.train.image_shape, cfg.privacy.enabled,
                              splits.train.num_classes if cfg.client.head == "shared" else 0)
    plan = make_privacy_plan(cfg, n_users, slots)
    make_mechanism(cfg, plan, GaussianNoise(0.0, 0), slots)  # refuses impossible mechanism settings now
    return RunSetup(cfg, splits, net, slots, plan)


def virtual_clients_per_round(cfg: Config, n_users: int) -> int:
    """M: the slots a round fills, the aggregate's denominator."""
    s = cfg.sampling
    return s.virtual_clients or virtual_client_slots(n_users, s.rate, s.users_per_client)


def planned_virtual_clients(cfg: Config) -> int:
    """rounds × M: how many virtual clients the run trains, read from its config and stored splits
    (fedemb.flower_env.resolved_engine weighs it) without preparing the run."""
    n_users = cfg.deployment.devices or load_splits(cfg.data).train.num_users
    return cfg.run.rounds * virtual_clients_per_round(cfg, n_users)


def privacy_unit(setup) -> str:
    """What one neighbouring relation adds or removes: a registered device's key on devices, else a user."""
    return "device" if setup.on_devices else "user"


def load_run_state(run_dir: Path) -> dict | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"cannot read the run state {path}: {exc}") from None


def check_resume(run_dir: Path, cfg: Config, setup: RunSetup) -> tuple[dict | None, PrivacyLedger]:
    """The state and ledger a resumed run continues from, or a ConfigError naming why the run cannot
    be continued without losing track of what it has already released. Changes nothing."""
    def refuse(why: str):
        raise ConfigError(f"cannot resume {run_dir}: {why} (nothing was changed)")

    state = load_run_state(run_dir)
    if state and state.get("private_state_removed"):
        refuse(f"it finished after round {state['strategy']['round']} and its server-private state was deleted "
               "(run.keep_private_state = false); start a new run")
    if not (run_dir / LEDGER_FILE).is_file():
        refuse(f"its privacy ledger {LEDGER_FILE} is missing" + (
            f", so the {state['strategy']['round']} rounds in {STATE_FILE} would go unaccounted" if state
            else "; if it never ran a round, start it again without --resume"))
    try:
        ledger = PrivacyLedger.load(run_dir / LEDGER_FILE)
    except (ValueError, KeyError, TypeError) as exc:
        refuse(f"{LEDGER_FILE} is not a readable privacy ledger ({exc})")
    expected = make_mechanism(cfg, setup.privacy, GaussianNoise(0.0, 0), setup.virtual_clients)
    problem = ledger.continuation_problem(delta=setup.privacy.delta, accountant=setup.privacy.accountant, stage=STAGE,
                                          completed_round=int(state["strategy"]["round"]) if state else 0,
                                          expected_entry=expected.ledger_entry)
    if problem:
        refuse(problem)
    return state, ledger
