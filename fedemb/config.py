"""Typed run configuration: TOML in, validated dataclasses out, fully resolved TOML back.

Every field is checked once here, and every error names the field (``sampling.rate``) so that a user
can fix the file without reading code.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedemb.errors import ConfigError, DataError

SAMPLING_METHODS = ("poisson", "fixed", "limited")
SIMULATION_MODES = ("workers", "devices")
SIMULATION_ENGINES = ("ray", "inprocess")
MECHANISMS = ("gaussian", "tree")
CLIPPING = ("fixed", "adaptive")
FIXED_SIZE_ACCOUNTING = ("refuse", "no_amplification")
ACCOUNTANTS = ("rdp", "prv")
PARTITIONS = ("dirichlet", "shards", "iid")
USER_SOURCES = ("", "folder")
IMAGE_CHANNELS = (0, 1, 3)
RESIZE_MODES = ("stretch", "crop")
HEAD_KINDS = ("local", "global", "shared")
HEAD_INITS = ("random", "anchors")
SYNTH_COVARIANCES = ("isotropic", "diag", "full", "lowrank")
SYNTH_INITS = ("mean", "random", "public")
SYNTH_CENTRES = ("none", "public")
NORM_KINDS = ("group", "keep", "affine")
INVERT_STATISTICS = ("dp", "batchnorm")


@dataclass
class RunConfig:
    name: str = "fedemb"
    rounds: int = 10
    seed: int = -1  # -1: draw from the OS's secure randomness
    eval_every: int = 5
    checkpoint_every: int = 10  # resumable state every n rounds (0: only the final model)
    keep_private_state: bool = False  # keep a finished run's complete state.pt (sampling key, tree noise) to extend it


@dataclass
class DataConfig:
    name: str = "digits"  # digits | idx | npz | npy | folder
    path: str = ""
    manifest: str = ""  # folder: a CSV with columns path, user (and optionally label), relative to data.path
    user_from: str = ""  # folder: "folder" takes users from a level above the classes (root/<user>/<class>/<file>)
    image_size: str = ""  # "HxW" to resize every image to; "": keep (a folder's images must agree)
    resize: str = "stretch"  # to image_size: "stretch" the whole image, or "crop" the centre to its aspect ratio first
    channels: int = 0  # 1 (grayscale) or 3 (RGB); 0: as stored (a folder: 3 if any image is colour, else 1)
    writers: str = ""  # QMNIST extended labels for the train images (idx only)
    test_writers: str = ""  # QMNIST extended labels for the t10k images (idx only)
    use_test_split: bool = False  # idx: evaluate on the t10k files instead of held-out train users
    partition: str = "dirichlet"  # used when the data has no user ids
    num_users: int = 100
    dirichlet_alpha: float = 1.0
    shards_per_user: int = 2
    eval_users: float = 0.2  # fraction of users held out for evaluation
    public_users: float = 0.0  # fraction of users declared public (for `fedemb pretrain`)
    held_out_classes: list[int] = field(default_factory=list)
    max_eval_examples: int = 5000
    split_seed: int = 0
    cache_dir: str = ""  # where each machine keeps the memory-mapped splits; "": $FEDEMB_CACHE_DIR or ~/.cache/fedemb


@dataclass
class ModelConfig:
    name: str = "fedemb_lenet"
    embedding_dim: int = 128
    norm: str = "group"  # group: BatchNorm converted to GroupNorm; keep: the model's own layers; affine: BatchNorm
    # replaced by the per-channel affine map it computes in eval mode (pretrained weights), trainable, no batch statistics
    batchnorm_in_update: bool = False  # allow BatchNorm in DP mode; its buffers travel in the clipped update
    init_checkpoint: str = ""  # state dict of backbone + embedding (e.g. from `fedemb pretrain`)
    pretrained_file: str = ""  # backbone weights via timm's pretrained_cfg_overlay=dict(file=...)


@dataclass
class SamplingConfig:
    method: str = "poisson"
    rate: float = 0.1  # q: probability that a user takes part in a round
    users_per_client: int = 8  # k: expected users per virtual client
    virtual_clients: int = 0  # M: slots per round; 0 derives round(q * N / k)
    min_separation: int = 1  # limited: rounds between two participations of one user
    max_participations: int = 0  # limited: participations per user over the run (0: no cap)


@dataclass
class ClientConfig:
    epochs: int = 1
    batch_size: int = 32
    max_examples: int = 2048
    lr: float = 0.005
    momentum: float = 0.9
    head_lr_scale: float = 100.0
    head_warmup_steps: int = 0
    head: str = "local"  # local: classes present in the virtual client; global: all classes; shared: the DP-FedAvg
    # baseline, one classifier over all classes that is part of the model, aggregated and noised with it
    head_init: str = "random"  # random: each virtual client draws its own; anchors: the run's fixed class anchors
    vectorize: int = 0  # >= 2: a node trains up to this many virtual clients at once (torch.func.vmap)


@dataclass
class ServerConfig:
    lr: float = 1.0
    momentum: float = 0.9


@dataclass
class AdaptiveClippingConfig:
    target_quantile: float = 0.5  # fraction of virtual clients whose update should be unclipped
    learning_rate: float = 0.2  # geometric step of C per round
    count_noise_std: float = 0.0  # std of the noise on the clipped count; 0: M / 20


@dataclass
class TrainingMetricsConfig:
    """DP training metrics: each round also releases a noisy sum of the virtual clients' bounded losses
    and a noisy clipped count, accounted jointly with the update (the update noise grows to pay)."""
    enabled: bool = False
    loss_bound: float = 5.0  # B: each virtual client's mean loss is clamped to [0, B] (non-finite: B)
    # 0: the larger of (B * M / 40 for the loss, M / 20 for the count) and the noise that takes 1% of the round's
    # budget each (small cohorts); adaptive clipping's count is reused
    loss_noise_std: float = 0.0  # std on the centred loss sum
    count_noise_std: float = 0.0  # std on the centred clipped count


@dataclass
class TreeConfig:
    restart_every: int = 0  # start a new tree every n rounds (0: one tree for the run)


@dataclass
class ProjectionConfig:
    """The paper's projection: set the noise for a cohort drawn from a large deployment's population,
    and train with the smaller cohort this simulation has, at the same noise on the mean update. The
    projected ε holds only for that deployment; the run's own ledger accounts the real population."""

    population: int = 0  # users of the projected deployment (e.g. 1_000_000); 0: no projection
    cohort: int = 0  # expected users per round there
    delta: float = 0.0  # 0: 1 / population^1.1


@dataclass
class PrivacyConfig:
    enabled: bool = True  # false: no clipping and no noise (non-private federated training)
    mechanism: str = "gaussian"  # gaussian: sampled Gaussian (needs Poisson sampling); tree: DP-FTRL
    clipping: str = "fixed"  # fixed: clip_norm throughout; adaptive: clip_norm is where C starts
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0  # z: noise std = z * clip_norm
    target_epsilon: float = 0.0  # > 0: never run a round that would exceed it
    calibrate_noise: bool = True  # with target_epsilon: choose z so that run.rounds spend it
    delta: float = 0.0  # 0: 1 / N^1.1
    accountant: str = "rdp"
    fixed_size_accounting: str = "refuse"
    adaptive: AdaptiveClippingConfig = field(default_factory=AdaptiveClippingConfig)
    metrics: TrainingMetricsConfig = field(default_factory=TrainingMetricsConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)


@dataclass
class FaultConfig:
    raise_rate: float = 0.0  # a virtual client's training raises (the node's other virtual clients go on)
    nan_rate: float = 0.0  # the node replies NaN
    timeout_rate: float = 0.0  # the node trains but replies after the round's deadline
    drop_rate: float = 0.0  # the node goes silent for the round: no reply before the deadline


@dataclass
class SimulationConfig:
    mode: str = "workers"  # workers: a few nodes train many virtual clients each; devices: one node per slot
    # ray: Flower's simulation engine; inprocess: the same strategy, messages and ClientApp called in this
    # process one after another (no Ray start-up: for debugging and small runs; ray_address does not apply)
    engine: str = "ray"
    num_supernodes: int = 0  # 0: workers: one per parallel ClientApp the resources allow; devices: M
    ray_address: str = ""  # an existing Ray cluster (also --ray-address); "": a local Ray for this run
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    round_timeout_s: float = 600.0
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class DeploymentConfig:
    """Training on real devices (Flower's deployment engine): the users are the SuperNodes, each holding
    one user's data (its node config: data-path, and user when the file holds several)."""

    devices: int = 0  # N: registered devices, the population the accountant and the denominator use; 0: no deployment
    min_devices: int = 0  # wait until this many are online before round 1 (0: all N)
    wait_s: float = 300.0  # how long to wait for them


@dataclass
class MonitoringConfig:
    """Server-private telemetry is always written to RUN/private/; these only add views of it."""
    private_tensorboard: bool = False  # also a separate TensorBoard run of the exact figures in private/tensorboard/
    private_console: bool = False  # also print server-private events on the console, marked [server-private]
    wait_progress_s: float = 15.0  # while waiting for devices or replies, a private line this often: whom, until when


@dataclass
class PretrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9


@dataclass
class SynthConfig:
    """`fedemb synth gmm`: the DP Gaussian mixture, the classifier trained on its samples, baselines."""

    epsilon: float = 4.0  # the synthesis stage's own budget, at the run's delta; the ledger adds training's
    centre: str = "none"  # none | public: subtract the public users' mean embedding before normalising
    clusters: int = 4  # per class
    iterations: int = 2  # DP-Lloyd iterations
    init: str = "mean"  # mean: random points around a DP class mean; random: data-independent; public: k-means on public users
    covariance: str = "diag"  # isotropic (no release) | diag | full | lowrank
    rank: int = 8  # lowrank: eigenvectors kept, the rest isotropic
    eigenvalue_floor: float = 1e-4
    contribution_bound: float = 1.0  # B: L2 bound on one user's per-cell counts
    budget_lloyd: float = 0.3  # shares of the stage's budget (normalised to sum to 1)
    budget_counts: float = 0.1
    budget_means: float = 0.4
    budget_covariances: float = 0.2
    samples_per_class: int = 2000
    project_samples: bool = True  # synthetic embeddings back onto the sphere, like the real ones
    mlp_hidden: int = 256
    mlp_epochs: int = 30
    mlp_lr: float = 0.001
    probe_epochs: int = 30  # DP-SGD linear probe baseline (Opacus, one user per sample)
    probe_lr: float = 2.0
    probe_batch_users: int = 64  # expected users per Poisson batch
    probe_max_examples: int = 256  # rows per user kept by the probe
    probe_clip: float = 1.0
    seed: int = -1  # -1: OS randomness for the noise (run.seed is not reused)


@dataclass
class InvertConfig:
    """`fedemb synth invert`: DP activation statistics, images inverted from them, classifiers trained on those."""

    epsilon: float = 2.0  # the stage's own budget (statistics + class prototypes), at the run's delta
    statistics: str = "dp"  # dp: a DP release | batchnorm: running statistics already inside the clipped update
    layers: str = "conv"  # conv: every Conv2d's output; or comma-separated module names
    activation_clip: float = 3.0  # per layer, a = this x its RMS on noise images; channel means clamped to [-a, a], mean squares to [0, a^2]
    contribution_bound: float = 1.0  # B: a user's examples weigh at most B in total
    budget_count: float = 0.1  # shares of the stage's budget (normalised to sum to 1)
    budget_means: float = 0.3
    budget_squares: float = 0.3
    budget_prototypes: float = 0.3
    images_per_class: int = 32
    steps: int = 500
    lr: float = 0.1
    weight_statistics: float = 1.0
    weight_class: float = 1.0
    weight_tv: float = 0.01
    weight_l2: float = 0.0001
    temperature: float = 0.1  # of the class term's softmax over cosine similarities
    jitter: int = 1  # pixels of random shift per step
    flip: bool = False  # random horizontal flips (off: a flipped digit is another symbol)
    ablation: bool = True  # also invert without the statistics term, and train on those images
    train_epochs: int = 60
    train_lr: float = 0.003
    distill_temperature: float = 0.1  # the private model's prototype softmax, as the teacher
    seed: int = -1  # -1: OS randomness for the noise


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = read_toml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's table, or a ConfigError naming the file and what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text: {path}") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``privacy.clip_norm=0.5``: the value is read as a TOML value, or as a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override must look like section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    _set_key(raw, key, value)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...] | dict[str, Any]) -> Config:
    """A new, validated config: ``cfg`` with ``section.key=value`` strings (or a key -> value mapping) applied."""
    raw = to_dict(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [item.partition("=")[::2] for item in overrides]
    for key, value in items:
        if isinstance(overrides, dict):
            _set_key(raw, key, value)
        else:
            apply_override(raw, f"{key}={value}")
    return config_from_dict(raw)


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {name!r} (known in {where or 'top level'}: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        name = f"{where}.{f.name}" if where else f.name
        values[f.name] = _coerce(hints[f.name], raw[f.name], name)
    return cls(**values)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover - programming error


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> None:
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def validate(cfg: Config) -> None:
    """Range checks that need no data. Checks against the data (k vs users) happen when it loads."""
    r, d, m, s, c, sv, p, sim = (cfg.run, cfg.data, cfg.model, cfg.sampling, cfg.client, cfg.server,
                                 cfg.privacy, cfg.simulation)
    _check(r.rounds >= 1, f"run.rounds must be >= 1, got {r.rounds}")
    _check(r.seed >= -1, f"run.seed must be >= 0 (or -1 for OS randomness), got {r.seed}")
    _check(r.eval_every >= 0, f"run.eval_every must be >= 0, got {r.eval_every}")
    _check(r.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {r.checkpoint_every}")
    from fedemb.data.loaders import DATASETS

    _one_of(d.name, tuple(DATASETS), "data.name")
    _one_of(d.partition, PARTITIONS, "data.partition")
    validate_image_folder(d)
    _check(d.num_users >= 2, f"data.num_users must be >= 2, got {d.num_users}")
    _check(d.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0, got {d.dirichlet_alpha}")
    _check(d.shards_per_user >= 1, f"data.shards_per_user must be >= 1, got {d.shards_per_user}")
    _check(0 < d.eval_users < 1, f"data.eval_users must be in (0, 1), got {d.eval_users}")
    _check(0 <= d.public_users < 1, f"data.public_users must be in [0, 1), got {d.public_users}")
    _check(d.eval_users + d.public_users < 1,
           "data.eval_users + data.public_users must leave users to train on")
    _check(d.max_eval_examples >= 2, f"data.max_eval_examples must be >= 2, got {d.max_eval_examples}")
    _check(m.embedding_dim >= 1, f"model.embedding_dim must be >= 1, got {m.embedding_dim}")
    _one_of(m.norm, NORM_KINDS, "model.norm")
    _one_of(s.method, SAMPLING_METHODS, "sampling.method")
    _check(0 < s.rate <= 1, f"sampling.rate must be in (0, 1], got {s.rate}")
    _check(s.users_per_client >= 1, f"sampling.users_per_client must be >= 1, got {s.users_per_client}")
    _check(s.virtual_clients >= 0, f"sampling.virtual_clients must be >= 0, got {s.virtual_clients}")
    _check(c.epochs >= 1, f"client.epochs must be >= 1, got {c.epochs}")
    _check(c.batch_size >= 1, f"client.batch_size must be >= 1, got {c.batch_size}")
    _check(c.max_examples >= 1, f"client.max_examples must be >= 1, got {c.max_examples}")
    _check(c.lr > 0, f"client.lr must be > 0, got {c.lr}")
    _check(0 <= c.momentum < 1, f"client.momentum must be in [0, 1), got {c.momentum}")
    _check(c.head_lr_scale > 0, f"client.head_lr_scale must be > 0, got {c.head_lr_scale}")
    _check(c.head_warmup_steps >= 0, f"client.head_warmup_steps must be >= 0, got {c.head_warmup_steps}")
    _one_of(c.head, HEAD_KINDS, "client.head")
    _one_of(c.head_init, HEAD_INITS, "client.head_init")
    _check(not (c.head == "shared" and c.head_init == "anchors"),
           "client.head = 'shared' trains the model's own classifier: client.head_init must be 'random'")
    _check(c.vectorize >= 0, f"client.vectorize must be >= 0 (0 or 1: one virtual client at a time), got {c.vectorize}")
    _check(sv.lr > 0, f"server.lr must be > 0, got {sv.lr}")
    _check(0 <= sv.momentum < 1, f"server.momentum must be in [0, 1), got {sv.momentum}")
    _check(p.clip_norm > 0, f"privacy.clip_norm must be > 0, got {p.clip_norm}")
    _check(p.noise_multiplier >= 0, f"privacy.noise_multiplier must be >= 0, got {p.noise_multiplier}")
    _check(p.target_epsilon >= 0, f"privacy.target_epsilon must be >= 0 (0: none), got {p.target_epsilon}")
    _check(0 <= p.delta < 1, f"privacy.delta must be in [0, 1) (0: 1/N^1.1), got {p.delta}")
    _one_of(p.accountant, ACCOUNTANTS, "privacy.accountant")
    _one_of(p.fixed_size_accounting, FIXED_SIZE_ACCOUNTING, "privacy.fixed_size_accounting")
    _one_of(p.mechanism, MECHANISMS, "privacy.mechanism")
    _one_of(p.clipping, CLIPPING, "privacy.clipping")
    _check(s.min_separation >= 1, f"sampling.min_separation must be >= 1, got {s.min_separation}")
    _check(s.max_participations >= 0, f"sampling.max_participations must be >= 0 (0: no cap), got {s.max_participations}")
    a = p.adaptive
    _check(0 < a.target_quantile < 1, f"privacy.adaptive.target_quantile must be in (0, 1), got {a.target_quantile}")
    _check(a.learning_rate > 0, f"privacy.adaptive.learning_rate must be > 0, got {a.learning_rate}")
    _check(a.count_noise_std >= 0, f"privacy.adaptive.count_noise_std must be >= 0 (0: M / 20), got {a.count_noise_std}")
    tm = p.metrics
    _check(tm.loss_bound > 0, f"privacy.metrics.loss_bound must be > 0, got {tm.loss_bound}")
    _check(tm.loss_noise_std >= 0, f"privacy.metrics.loss_noise_std must be >= 0 (0: the default), got {tm.loss_noise_std}")
    _check(tm.count_noise_std >= 0, f"privacy.metrics.count_noise_std must be >= 0 (0: the default), got {tm.count_noise_std}")
    if p.enabled and p.mechanism == "tree" and tm.enabled:
        raise ConfigError("privacy.metrics works with privacy.mechanism = 'gaussian' only (its queries are "
                          "accounted with the round's sampled Gaussian)")
    validate_projection(cfg)
    _check(p.tree.restart_every >= 0, f"privacy.tree.restart_every must be >= 0, got {p.tree.restart_every}")
    if p.enabled and p.mechanism == "tree" and p.clipping == "adaptive":
        raise ConfigError("privacy.clipping = 'adaptive' works with privacy.mechanism = 'gaussian' only "
                          "(its clipped-count query is accounted as a sampled Gaussian)")
    if p.enabled and p.mechanism == "gaussian" and s.method == "limited":
        raise ConfigError("sampling.method = 'limited' gives no amplification by sampling, which the sampled "
                          "Gaussian accountant assumes; use privacy.mechanism = 'tree' (DP-FTRL) with it")
    if p.enabled and p.mechanism == "gaussian" and s.method == "fixed" and p.fixed_size_accounting == "refuse":
        raise ConfigError(
            "sampling.method = 'fixed' breaks the Poisson-sampling assumption of the accountant; "
            "use Poisson sampling, or set privacy.fixed_size_accounting = 'no_amplification' "
            "to account every round as if every user took part (no amplification by sampling)")
    _check(sim.num_supernodes >= 0, f"simulation.num_supernodes must be >= 0, got {sim.num_supernodes}")
    _one_of(sim.mode, SIMULATION_MODES, "simulation.mode")
    _one_of(sim.engine, SIMULATION_ENGINES, "simulation.engine")
    _check(not (sim.engine == "inprocess" and sim.ray_address),
           "simulation.ray_address needs simulation.engine = 'ray'")
    _check(sim.cpus_per_client > 0, f"simulation.cpus_per_client must be > 0, got {sim.cpus_per_client}")
    _check(sim.gpus_per_client >= 0, f"simulation.gpus_per_client must be >= 0, got {sim.gpus_per_client}")
    _check(sim.round_timeout_s > 0, f"simulation.round_timeout_s must be > 0, got {sim.round_timeout_s}")
    for rate_name in ("raise_rate", "nan_rate", "timeout_rate", "drop_rate"):
        v = getattr(sim.faults, rate_name)
        _check(0 <= v <= 1, f"simulation.faults.{rate_name} must be in [0, 1], got {v}")
    f = sim.faults
    _check(f.raise_rate + f.nan_rate + f.timeout_rate + f.drop_rate <= 1,
           "simulation.faults rates must add up to at most 1")
    validate_deployment(cfg)
    pt = cfg.pretrain
    _check(pt.epochs >= 1, f"pretrain.epochs must be >= 1, got {pt.epochs}")
    _check(pt.batch_size >= 1, f"pretrain.batch_size must be >= 1, got {pt.batch_size}")
    _check(pt.lr > 0, f"pretrain.lr must be > 0, got {pt.lr}")
    validate_synth(cfg.synth)
    validate_invert(cfg.invert)


def validate_image_folder(d: DataConfig) -> None:
    """The image settings of every source, and the keys that only image folders have."""
    if d.name != "folder":
        for key in ("manifest", "user_from"):
            _check(not getattr(d, key), f"data.{key} applies to data.name = 'folder' only, not {d.name!r}")
    _check(d.user_from in USER_SOURCES,
           f"data.user_from must be \"folder\" (users from root/<user>/<class>/) or \"\", got {d.user_from!r}")
    _check(not (d.manifest and d.user_from),
           "data.manifest and data.user_from both say where users come from: set one of them")
    _check(d.channels in IMAGE_CHANNELS,
           f"data.channels must be 1, 3 or 0 (0: as stored; a folder: 3 if any image is colour), got {d.channels}")
    _one_of(d.resize, RESIZE_MODES, "data.resize")
    _check(d.resize == "stretch" or bool(d.image_size), "data.resize = 'crop' needs data.image_size (the size to crop to)")
    if d.image_size:
        from fedemb.data.image_files import parse_size

        try:
            parse_size(d.image_size, "data.image_size")
        except DataError as exc:
            raise ConfigError(str(exc)) from None


def validate_projection(cfg: Config) -> None:
    pr, p, s = cfg.privacy.projection, cfg.privacy, cfg.sampling
    _check(pr.population >= 0 and pr.cohort >= 0, "privacy.projection.population and .cohort must be >= 0")
    _check(0 <= pr.delta < 1, f"privacy.projection.delta must be in [0, 1), got {pr.delta}")
    if not pr.population:
        return
    _check(1 <= pr.cohort <= pr.population,
           f"privacy.projection.cohort must be in [1, population = {pr.population}], got {pr.cohort}")
    _check(pr.cohort >= s.users_per_client,
           f"privacy.projection.cohort = {pr.cohort} is smaller than sampling.users_per_client = {s.users_per_client}")
    _check(p.enabled and p.mechanism == "gaussian" and s.method == "poisson" and p.clipping == "fixed",
           "privacy.projection needs the sampled Gaussian with Poisson sampling and fixed clipping")
    _check(p.target_epsilon > 0 and p.calibrate_noise,
           "privacy.projection calibrates the noise for privacy.target_epsilon: set it (> 0) and keep calibrate_noise")


def validate_deployment(cfg: Config) -> None:
    dp = cfg.deployment
    _check(dp.devices >= 0, f"deployment.devices must be >= 0 (0: not a deployment), got {dp.devices}")
    _check(dp.min_devices >= 0 and (dp.devices == 0 or dp.min_devices <= dp.devices),
           f"deployment.min_devices must be in [0, deployment.devices = {dp.devices}], got {dp.min_devices}")
    _check(dp.wait_s > 0, f"deployment.wait_s must be > 0, got {dp.wait_s}")
    _check(cfg.monitoring.wait_progress_s > 0,
           f"monitoring.wait_progress_s must be > 0, got {cfg.monitoring.wait_progress_s}")
    if dp.devices and cfg.sampling.users_per_client != 1:
        raise ConfigError(
            f"deployment.devices is set, so each virtual client is one device (one user): "
            f"sampling.users_per_client must be 1, got {cfg.sampling.users_per_client} "
            "(a virtual client of k users trains on their pooled data, which devices never share)")
    if dp.devices and cfg.sampling.virtual_clients:
        raise ConfigError("deployment.devices sets the denominator (round(q x devices)); "
                          "leave sampling.virtual_clients at 0")


def validate_invert(iv: InvertConfig) -> None:
    _check(iv.epsilon > 0, f"invert.epsilon must be > 0, got {iv.epsilon}")
    _one_of(iv.statistics, INVERT_STATISTICS, "invert.statistics")
    _check(bool(iv.layers.strip()), "invert.layers must be 'conv' or module names")
    for name in ("activation_clip", "contribution_bound", "lr", "temperature", "train_lr", "distill_temperature"):
        _check(getattr(iv, name) > 0, f"invert.{name} must be > 0, got {getattr(iv, name)}")
    for name in ("budget_count", "budget_means", "budget_squares", "budget_prototypes", "weight_statistics",
                 "weight_class", "weight_tv", "weight_l2", "jitter", "steps"):
        _check(getattr(iv, name) >= 0, f"invert.{name} must be >= 0, got {getattr(iv, name)}")
    if iv.statistics == "dp":
        _check(min(iv.budget_count, iv.budget_means, iv.budget_squares) > 0,
               "invert.budget_count, budget_means and budget_squares must be > 0 for DP statistics")
    _check(iv.budget_prototypes > 0, "invert.budget_prototypes must be > 0: the class term needs DP prototypes")
    for name in ("images_per_class", "train_epochs"):
        _check(getattr(iv, name) >= 1, f"invert.{name} must be >= 1, got {getattr(iv, name)}")
    _check(iv.seed >= -1, f"invert.seed must be >= 0 (or -1 for OS randomness), got {iv.seed}")


def validate_synth(sy: SynthConfig) -> None:
    _check(sy.epsilon > 0, f"synth.epsilon must be > 0, got {sy.epsilon}")
    _one_of(sy.centre, SYNTH_CENTRES, "synth.centre")
    _one_of(sy.covariance, SYNTH_COVARIANCES, "synth.covariance")
    _one_of(sy.init, SYNTH_INITS, "synth.init")
    _check(sy.clusters >= 1, f"synth.clusters must be >= 1, got {sy.clusters}")
    _check(sy.iterations >= 0, f"synth.iterations must be >= 0, got {sy.iterations}")
    _check(sy.rank >= 1, f"synth.rank must be >= 1, got {sy.rank}")
    _check(sy.eigenvalue_floor > 0, f"synth.eigenvalue_floor must be > 0, got {sy.eigenvalue_floor}")
    _check(sy.contribution_bound > 0, f"synth.contribution_bound must be > 0, got {sy.contribution_bound}")
    for name in ("budget_lloyd", "budget_counts", "budget_means", "budget_covariances"):
        _check(getattr(sy, name) >= 0, f"synth.{name} must be >= 0, got {getattr(sy, name)}")
    _check(sy.budget_counts > 0 and sy.budget_means > 0, "synth.budget_counts and synth.budget_means must be > 0")
    _check(sy.covariance == "isotropic" or sy.budget_covariances > 0,
           f"synth.covariance = {sy.covariance!r} needs synth.budget_covariances > 0")
    _check(sy.clusters == 1 or sy.budget_lloyd > 0 or (sy.init == "public" and sy.iterations == 0),
           "synth.clusters > 1 needs synth.budget_lloyd > 0 for DP-Lloyd")
    for name in ("samples_per_class", "mlp_hidden", "mlp_epochs", "probe_epochs", "probe_batch_users",
                 "probe_max_examples"):
        _check(getattr(sy, name) >= 1, f"synth.{name} must be >= 1, got {getattr(sy, name)}")
    for name in ("mlp_lr", "probe_lr", "probe_clip"):
        _check(getattr(sy, name) > 0, f"synth.{name} must be > 0, got {getattr(sy, name)}")
    _check(sy.seed >= -1, f"synth.seed must be >= 0 (or -1 for OS randomness), got {sy.seed}")
