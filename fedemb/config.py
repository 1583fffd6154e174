"""The run configuration: one typed model per TOML section, validated once, written back fully resolved.

Every field carries its type, range and meaning here; docs/configuration.md is generated from these
models (``fedemb config docs``). Every error is one line naming the key (``sampling.rate must be in
(0, 1], got 1.5``) so that a user can fix the file without reading code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedemb.errors import ConfigError, DataError
from fedemb.typed_config import Settings, parse

DataName = Literal["digits", "idx", "npz", "npy", "folder", "procedural"]
NormKind = Literal["group", "keep", "affine"]


class RunConfig(Settings):
    """What the run is called, how long it trains, and when it evaluates and saves."""

    name: str = "fedemb"
    """run directory prefix"""
    rounds: int = Field(10, ge=1)
    """federated rounds"""
    seed: int = Field(-1, ge=-1)
    """-1: OS randomness (a real release); >= 0: a reproducible run whose noise is predictable"""
    eval_every: int = Field(5, ge=0)
    """evaluate on held-out users every n rounds (and after the last)"""
    checkpoint_every: int = Field(10, ge=0)
    """every n rounds: the model (`checkpoints/round-NNNNN.pt`) and the state `fedemb simulate --resume`
    continues from (`checkpoints/state.pt`, server-private); 0: only the final model"""
    keep_private_state: bool = False
    """when the run finishes (all rounds, or the ε target reached): false replaces `checkpoints/state.pt`
    by a stub that only says the run finished, deleting the server secret, DP-FTRL's tree noise and the
    noise generator (`--resume` then refuses with one line); true keeps the complete last state so the run
    can be extended (raise `run.rounds` in its config.toml and `--resume`)"""


class ProceduralConfig(Settings):
    """data.name = "procedural": a synthetic population of `users` users whose data each node generates
    when it trains them, deterministically from (`seed`, user id), from a real base dataset: each user
    is one real writer of the base's training writers, a label mix and its own transformation
    ([procedural.md](procedural.md)). Evaluation uses the base's held-out writers (`data.eval_users`),
    real and never derived from. The privacy unit is the derived user; derived users share writers, so
    utility is optimistic: for scale, systems and algorithm studies, not claims about real people."""

    users: int = Field(1_000_000, ge=1, le=1 << 40)
    """N, the population size: user ids are 0..N-1, and nothing anywhere holds one value per user"""
    base: Literal["digits", "mnist"] = "digits"
    """the real dataset: digits (scikit-learn's, its writers the users of `data.partition` /
    `data.num_users`) or mnist (an IDX directory in `data.path` and its QMNIST writer file in
    `data.writers`)"""
    examples_min: int = Field(10, ge=1, le=4096)
    """fewest examples a user has (each user's count is uniform in `examples_min`..`examples_max`)"""
    examples_max: int = Field(40, ge=1, le=4096)
    """most examples a user has"""
    label_concentration: float = Field(1.0, gt=0)
    """Dirichlet concentration of a user's label mix over its writer's classes (smaller: fewer classes
    per user)"""
    rotation_deg: float = Field(10.0, ge=0, le=90)
    """largest rotation of a user's transformation, in degrees (uniform in ±)"""
    scale: float = Field(0.1, ge=0, lt=0.5)
    """largest relative change of size (uniform in ±)"""
    shear_deg: float = Field(10.0, ge=0, le=45)
    """largest shear, in degrees (uniform in ±)"""
    translate: float = Field(0.06, ge=0, le=0.3)
    """largest shift along each axis, as a fraction of the image side (uniform in ±)"""
    elastic: float = Field(0.04, ge=0, le=0.2)
    """elastic distortion: a smooth random displacement field (4×4 knots, bilinear), each knot's shift up
    to this fraction of the image side"""
    stroke: float = Field(0.6, ge=0, le=1)
    """stroke width: a user's strokes move this far (at most) towards their 3×3 grey dilation (thicker)
    or erosion (thinner)"""
    seed: int = Field(0, ge=0)
    """the population's seed: with a user id it keys everything the user's data is made of (a
    data-generation key, public, not a DP draw)"""

    @model_validator(mode="after")
    def _range(self) -> ProceduralConfig:
        _require(self.examples_min <= self.examples_max,
                 f"data.procedural.examples_min ({self.examples_min}) must be <= data.procedural.examples_max "
                 f"({self.examples_max})")
        return self


class DataConfig(Settings):
    """Where the images come from, who their users are, and which users are held out
    ([data.md](data.md) describes each source)."""

    name: DataName = "digits"
    """the source: digits (scikit-learn's bundled digits), idx, npz, npy, folder, or procedural (users
    generated from a real base dataset, `data.procedural`)"""
    path: str = ""
    """idx: directory of IDX files; npz: the file; npy: a directory with x.npy, y.npy and optionally
    user.npy, memory-mapped (for populations larger than memory); folder: the root of the image tree
    (root/<class>/<file>); procedural on mnist: the MNIST IDX directory. Arrays may be (n, H, W),
    (n, H, W, C) or (n, C, H, W), uint8 or float in [0, 1]
    ([data.md](data.md#image-arrays-npz-and-npy))"""
    manifest: str = ""
    """folder: a CSV, relative to `path` unless absolute, with a header and columns `path` (relative to the
    root, e.g. `cat/001.jpg`), `user` (integer or name; names become 0, 1, ... in sorted order) and
    optionally `label` (integer class id, replacing the folder's class)"""
    user_from: Literal["", "folder"] = ""
    """folder, without a manifest: "folder" reads users from a level above the classes
    (root/<user>/<class>/<file>); "": synthetic users (`partition`, `num_users`)"""
    image_size: str = ""
    """any source: "HxW" (e.g. "32x32") resizes every image to H high, W wide, the size the model then
    takes; "": keep the size (a folder's images must then share one)"""
    resize: Literal["stretch", "crop"] = "stretch"
    """how `image_size` is reached: "stretch" the whole image, or "crop" its centre to H:W's aspect ratio
    first (nothing distorted, the edges lost)"""
    channels: Literal[0, 1, 3] = 0
    """any source: 1 (grayscale) or 3 (RGB) the model takes; 0: as stored (arrays: 1, 3 or 4; a folder: 3
    if any image is in colour, else 1)"""
    writers: str = ""
    """idx (and procedural on mnist): a QMNIST extended-label file giving the train images' real writer ids"""
    test_writers: str = ""
    """idx: a QMNIST extended-label file for the t10k images"""
    use_test_split: bool = False
    """idx: evaluate on the t10k files instead of held-out train users"""
    partition: Literal["dirichlet", "shards", "iid"] = "dirichlet"
    """synthetic users when the data has no user ids"""
    num_users: int = Field(100, ge=2)
    """number of synthetic users"""
    dirichlet_alpha: float = Field(1.0, gt=0)
    """label skew of the dirichlet partition (smaller: more skewed)"""
    shards_per_user: int = Field(2, ge=1)
    """shards partition: label-sorted shards per user"""
    eval_users: float = Field(0.2, gt=0, lt=1)
    """fraction of users held out for evaluation"""
    public_users: float = Field(0.0, ge=0, lt=1)
    """fraction of users declared public (for `fedemb pretrain`)"""
    held_out_classes: list[int] = Field(default_factory=list)
    """classes excluded from training; evaluation uses only them"""
    max_eval_examples: int = Field(5000, ge=2)
    """evaluation subsample (metrics are exact over all its pairs)"""
    split_seed: int = 0
    """seed of the user split and the synthetic partition"""
    cache_dir: str = ""
    """where each machine keeps the splits as memory-mapped files (built once per data config);
    "": `$FEDEMB_CACHE_DIR` or `~/.cache/fedemb`"""
    procedural: ProceduralConfig = Field(default_factory=ProceduralConfig)
    """data.name = "procedural": the generated population"""

    @field_validator("image_size")
    @classmethod
    def _size_is_hxw(cls, value: str) -> str:
        if value:
            from fedemb.data.image_files import parse_size

            try:
                parse_size(value, "data.image_size")
            except DataError as exc:
                raise ValueError(str(exc).removeprefix("data.image_size ")) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.name != "folder":
            for key in ("manifest", "user_from"):
                _require(not getattr(self, key), f"data.{key} applies to data.name = 'folder' only, not {self.name!r}")
        _require(not (self.manifest and self.user_from),
                 "data.manifest and data.user_from both say where users come from: set one of them")
        _require(self.resize == "stretch" or bool(self.image_size),
                 "data.resize = 'crop' needs data.image_size (the size to crop to)")
        _require(self.eval_users + self.public_users < 1,
                 "data.eval_users + data.public_users must leave users to train on")
        if self.name != "procedural":
            _require(self.procedural == ProceduralConfig(),
                     f"data.procedural applies to data.name = 'procedural' only, not {self.name!r}")
        elif self.procedural.base == "mnist":
            _require(bool(self.path and self.writers), "data.procedural.base = 'mnist' needs data.path (the MNIST "
                     "IDX directory) and data.writers (its QMNIST writer file): the writers are the users' sources")
        else:
            _require(not (self.path or self.writers or self.test_writers or self.use_test_split),
                     "data.path, data.writers, data.test_writers and data.use_test_split apply to "
                     "data.procedural.base = 'mnist', not 'digits'")
        return self

    def procedural_base(self) -> DataConfig:
        """The config of the real dataset a procedural population derives from: its writers split into
        the training pool and the held-out evaluation writers as that source alone would be."""
        fields = {k: v for k, v in self.model_dump().items() if k != "procedural"}
        return DataConfig(**{**fields, "name": "idx" if self.procedural.base == "mnist" else "digits"})


class ModelConfig(Settings):
    """The backbone and its embedding layer ([backbones.md](backbones.md))."""

    name: str = "fedemb_lenet"
    """any timm model name; fedemb registers fedemb_lenet and fedemb_lenet_small"""
    embedding_dim: int = Field(128, ge=1)
    """embedding layer width"""
    norm: NormKind = "group"
    """group: BatchNorm converted to GroupNorm; keep: leave the model's layers; affine: each BatchNorm
    becomes the per-channel affine map it computes in eval mode (trainable, no batch statistics), which
    keeps pretrained BatchNorm weights usable under DP"""
    batchnorm_in_update: bool = False
    """allow BatchNorm in DP mode (its statistics travel in the clipped update)"""
    init_checkpoint: str = ""
    """start from a backbone + embedding state dict (e.g. from `fedemb pretrain`)"""
    pretrained_file: str = ""
    """backbone weights through timm's `pretrained_cfg_overlay=dict(file=...)`; e.g. the EfficientNet-Lite0
    ImageNet weights from `fedemb data fetch imagenet-weights` with name `tf_efficientnet_lite0`"""
    train_only: list[str] = Field(default_factory=list)
    """module paths or parameter names trained federatedly (e.g. ["embedding", "backbone.conv_head"]);
    everything else keeps its initial (pretrained) values and is never sent back, clipped or noised, so
    the noise covers fewer parameters; []: the whole model"""


class SamplingConfig(Settings):
    """Which users take part in a round, and how they are grouped into virtual clients."""

    method: Literal["poisson", "fixed", "limited"] = "poisson"
    """poisson; fixed (size q·N without replacement; see privacy.fixed_size_accounting); limited (q·N users
    among those the participation limits allow; for DP-FTRL)"""
    rate: float = Field(0.1, gt=0, le=1)
    """q: the probability that a user takes part in a round"""
    users_per_client: int = Field(8, ge=1)
    """k: expected users per virtual client"""
    virtual_clients: int = Field(0, ge=0)
    """M: virtual-client slots per round, the denominator of the mean update; 0 derives round(q·N/k)"""
    min_separation: int = Field(1, ge=1)
    """limited: rounds between two participations of one user"""
    max_participations: int = Field(0, ge=0)
    """limited: participations per user over the run (0: no cap)"""


class ClientConfig(Settings):
    """Local training of a virtual client, with its own classification head."""

    epochs: int = Field(1, ge=1)
    """local epochs over the virtual client's interleaved, shuffled examples"""
    batch_size: int = Field(32, ge=1)
    """local minibatch size"""
    max_examples: int = Field(2048, ge=1)
    """cap on examples per virtual client per round (over all epochs)"""
    lr: float = Field(0.005, gt=0)
    """client SGD learning rate (the optimizer is reset every round)"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """client SGD momentum"""
    head_lr_scale: float = Field(100.0, gt=0)
    """head learning rate = lr × this"""
    head_warmup_steps: int = Field(0, ge=0)
    """R > 0: the first R steps train only the head, then only the backbone"""
    head: Literal["local", "global", "shared"] = "local"
    """local: classes present in the virtual client; global: all classes; shared: the DP-FedAvg baseline
    (no partial aggregation): one classifier over all classes is part of the model, trained from the
    server's copy, and aggregated, clipped and noised with everything else (head_init must be random)"""
    head_init: Literal["random", "anchors"] = "random"
    """random: each virtual client draws its own head (the reference); anchors: every head starts from the
    run's fixed random class anchors (one unit vector per class, from the training key, no data), so all
    virtual clients pull a class the same way"""
    head_logits: Literal["dot", "cosine"] = "cosine"
    """cosine: logits = head_scale × the cosine of the embedding and the class row (a normalised softmax:
    no client can sharpen its softmax by growing the model, and training matches evaluation's cosine
    similarity); dot: logits = embedding · class row (the reference's linear head, whose logit scale
    grows with the model: [divergence.md](divergence.md))"""
    head_scale: float = Field(4.0, gt=0)
    """head_logits = "cosine": the scale s of the cosine logits (the softmax's inverse temperature; 4 was
    best of 2, 4, 8, 16, 32 on MNIST writers and digits)"""
    vectorize: int = Field(0, ge=0)
    """>= 2: a node trains up to this many virtual clients at once, over stacked per-client weights (vmap
    for layers that cannot be stacked); the same results up to float rounding, 1.4-2x faster on CPU for
    small models ([performance.md](performance.md)); 0 or 1: one at a time"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where a node trains: auto: its CUDA device when it has one it may use (in Ray simulation, only with
    simulation.gpus_per_client > 0), else its CPUs; cuda: refuse to train without one. Updates leave the
    device before they are clipped, so clipping and the reply are the same code either way"""

    @model_validator(mode="after")
    def _head_init_fits_head(self) -> ClientConfig:
        _require(not (self.head == "shared" and self.head_init == "anchors"),
                 "client.head = 'shared' trains the model's own classifier: client.head_init must be 'random'")
        return self


class ServerConfig(Settings):
    """The server optimizer, applied to the noisy mean update."""

    lr: float = Field(1.0, gt=0)
    """server SGD learning rate"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """server SGD momentum"""
    noise_step_limit: float = Field(0.0, ge=0)
    """> 0: the step is lowered to min(lr, limit / r) for the whole run, where r is the expected norm of
    the noise on the mean update in units of privacy.clip_norm (σ·√d / (M·C): a constant of the config, no
    data), so the noise moves the model by at most about limit × C a round whatever ε is; 0: lr as set"""


class AdaptiveClippingConfig(Settings):
    """privacy.clipping = "adaptive": C tracks a quantile of the update norms, from a DP clipped count."""

    target_quantile: float = Field(0.5, gt=0, lt=1)
    """fraction of virtual clients whose update should be unclipped"""
    learning_rate: float = Field(0.2, gt=0)
    """geometric step of C per round"""
    count_noise_std: float = Field(0.0, ge=0)
    """std of the noise on the clipped count; 0: M / 20"""
    scale_server_step: bool = True
    """multiply each server step by clip_norm / C (C: the clip norm of the round), so that C decides which
    updates are clipped and server.lr how far the model moves, as with fixed clipping at clip_norm; false:
    the server step grows with C (Andrew et al.'s rule as published)"""


class TrainingMetricsConfig(Settings):
    """DP training metrics: each round also releases a noisy sum of the virtual clients' bounded losses and
    a noisy clipped count, published as `dp-train-loss` and `dp-fraction-clipped` (results.json history,
    TensorBoard `1_training/dp_*`, the progress bar). They are one Gaussian mechanism with the update: the
    update noise grows so that the accounted z (and ε) does not change. Gaussian mechanism only."""

    enabled: bool = False
    """release the DP training metrics"""
    loss_bound: float = Field(5.0, gt=0)
    """B: each virtual client's mean loss is clamped to [0, B] (non-finite: B); the loss query's
    sensitivity is B/2 (k = 1) or B (k > 1)"""
    loss_noise_std: float = Field(0.0, ge=0)
    """std on the centred loss sum; 0: B·M/40 (the released mean loss then has noise std B/40), or more
    where that would take over 1% of the round's budget (small cohorts: 10·S·z)"""
    count_noise_std: float = Field(0.0, ge=0)
    """std on the centred clipped count; 0: M/20, or more where that would take over 1% of the round's
    budget (with adaptive clipping its count is reused)"""


class TreeConfig(Settings):
    """privacy.mechanism = "tree": DP-FTRL tree aggregation."""

    restart_every: int = Field(0, ge=0)
    """start a new tree every n rounds (0: one tree for the run)"""


class ProjectionConfig(Settings):
    """The paper's projection: z is calibrated for target_epsilon at the rate cohort / population of a
    deployment this large, then scaled by M / (cohort / k), so this run's mean update gets that
    deployment's noise std. results.json gives the projected ε under `privacy.projection` (valid only for
    that deployment); the run's ledger and `privacy.epsilon` stay the real population's, which are much
    larger. Needs the sampled Gaussian, Poisson sampling, fixed clipping and a target."""

    population: int = Field(0, ge=0)
    """users of the projected deployment (e.g. 1_000_000); 0: no projection"""
    cohort: int = Field(0, ge=0)
    """expected users per round in the projected deployment"""
    delta: float = Field(0.0, ge=0, lt=1)
    """0: 1 / population^1.1"""


class PrivacyConfig(Settings):
    """User-level differential privacy of the training: clipping, noise, accounting
    ([privacy.md](privacy.md))."""

    enabled: bool = True
    """false: no clipping, no noise (non-private federated baseline; ledger entries say ε = ∞)"""
    mechanism: Literal["gaussian", "tree"] = "gaussian"
    """gaussian: sampled Gaussian (Poisson sampling, amplification); tree: DP-FTRL tree aggregation (no
    amplification; use with sampling.method = "limited")"""
    clipping: Literal["fixed", "adaptive"] = "fixed"
    """fixed: clip_norm throughout; adaptive (gaussian only): C starts at clip_norm and tracks a quantile"""
    clip_norm: float = Field(1.0, gt=0)
    """C: each virtual client's update is clipped to this L2 norm"""
    noise_multiplier: float = Field(1.0, ge=0)
    """z: noise std = z·C on the sum"""
    target_epsilon: float = Field(0.0, ge=0)
    """> 0: never run a round that would exceed it; 0: no target"""
    calibrate_noise: bool = True
    """with a target: choose z so that run.rounds spend it"""
    delta: float = Field(0.0, ge=0, lt=1)
    """0: 1/N^1.1"""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant"""
    fixed_size_accounting: Literal["refuse", "no_amplification"] = "refuse"
    """sampling.method = "fixed" breaks the Poisson assumption: refuse, or account every round as if every
    user took part"""
    adaptive: AdaptiveClippingConfig = Field(default_factory=AdaptiveClippingConfig)
    metrics: TrainingMetricsConfig = Field(default_factory=TrainingMetricsConfig)
    tree: TreeConfig = Field(default_factory=TreeConfig)
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)

    @model_validator(mode="after")
    def _mechanism_supports(self) -> PrivacyConfig:
        if self.enabled and self.mechanism == "tree":
            _require(not self.metrics.enabled, "privacy.metrics works with privacy.mechanism = 'gaussian' only "
                                               "(its queries are accounted with the round's sampled Gaussian)")
            _require(self.clipping != "adaptive", "privacy.clipping = 'adaptive' works with privacy.mechanism = "
                     "'gaussian' only (its clipped-count query is accounted as a sampled Gaussian)")
        return self


class FaultConfig(Settings):
    """Fault injection, to see how a run copes (simulation only). The first four are drawn per virtual
    client and cost that virtual client only (its node replies for the others and counts it); the
    node_ rates are drawn per node and round and cost the node's whole reply. A simulated deadline costs
    no real waiting: a faulty node replies at once with a marker, and the server takes that reply as
    arrived after the deadline (docs/privacy.md, Faults)."""

    raise_rate: float = Field(0.0, ge=0, le=1)
    """a virtual client's training raises (it adds nothing; the node's other virtual clients are kept)"""
    nan_rate: float = Field(0.0, ge=0, le=1)
    """a virtual client's update is NaN, which makes its node's whole reply NaN (the server rejects it)"""
    timeout_rate: float = Field(0.0, ge=0, le=1)
    """a virtual client's reply would come after the round's deadline: it adds nothing and is counted as
    timed out; the node's other virtual clients are kept"""
    drop_rate: float = Field(0.0, ge=0, le=1)
    """a virtual client goes silent for the round: it adds nothing and is counted as dropped; the node's
    other virtual clients are kept"""
    node_timeout_rate: float = Field(0.0, ge=0, le=1)
    """a node's whole reply comes after the round's deadline (simulated: no real waiting); all its
    virtual clients count as missing"""
    node_drop_rate: float = Field(0.0, ge=0, le=1)
    """a node goes silent for the round (simulated: no real waiting); all its virtual clients count as
    missing"""

    @model_validator(mode="after")
    def _rates_add_up(self) -> FaultConfig:
        _require(self.raise_rate + self.nan_rate + self.timeout_rate + self.drop_rate <= 1,
                 "simulation.faults rates of virtual clients (raise, nan, timeout, drop) must add up to at most 1")
        _require(self.node_timeout_rate + self.node_drop_rate <= 1,
                 "simulation.faults.node_timeout_rate + node_drop_rate must be at most 1")
        return self


class SimulationConfig(Settings):
    """How Flower's simulation runs the ClientApps."""

    mode: Literal["workers", "devices"] = "workers"
    """workers: a few nodes each train many virtual clients per round, balanced by examples; devices: one
    node per virtual-client slot"""
    engine: Literal["auto", "ray", "inprocess"] = "auto"
    """ray: Flower's simulation engine (ClientApps in Ray actors, in parallel); inprocess: the same
    strategy, messages and ClientApp called one after another in this process, with no Ray start-up;
    auto: inprocess on a machine of at most 2 CPUs with no Ray address and no GPU shares (the first round
    starts in under 10 s instead of about 17: [performance.md](performance.md), "Start-up") for a run of
    fewer than 10,000 virtual clients (rounds × M), ray otherwise: on 2 CPUs ray's steady rounds are about
    1.5× faster (two nodes at once), which a long run's rounds repay. A seeded run gives the same model
    and ledger, bit for bit, on both"""
    num_supernodes: int = Field(0, ge=0)
    """simulated nodes; 0: workers: one per ClientApp the CPUs (and GPU shares) can run at once; devices: M"""
    ray_address: str = ""
    """run on this existing Ray cluster (also `--ray-address`; see [cluster.md](cluster.md)); "": a local
    Ray for this run"""
    cpus_per_client: float = Field(1.0, gt=0)
    """Ray CPUs per ClientApp"""
    gpus_per_client: float = Field(0.0, ge=0)
    """Ray GPUs per ClientApp"""
    round_timeout_s: float = Field(600.0, gt=0)
    """replies later than this count as missing (simulated faults, simulation.faults, cost no waiting)"""
    faults: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _address_needs_ray(self) -> SimulationConfig:
        _require(not (self.engine == "inprocess" and self.ray_address),
                 "simulation.ray_address needs simulation.engine = 'ray'")
        return self


class DeploymentConfig(Settings):
    """Training on real devices through Flower's deployment engine ([deployment.md](deployment.md)): the
    users are the SuperNodes, each holding one user's data (node config `data-path`, and `user` when the
    file holds several)."""

    devices: int = Field(0, ge=0)
    """N, the registered devices: the population for the accountant (and the default δ = 1/N^1.1) and the
    denominator round(q·N). 0: not a deployment. When set, `sampling.users_per_client` must be 1 and
    `sampling.virtual_clients` 0"""
    min_devices: int = Field(0, ge=0)
    """online devices to wait for before round 1 (0: all N); later rounds wait for at least one"""
    wait_s: float = Field(300.0, gt=0)
    """how long to wait; then the run stops with the reason in results.json (stop_reason)"""

    @model_validator(mode="after")
    def _min_within(self) -> DeploymentConfig:
        _require(self.devices == 0 or self.min_devices <= self.devices,
                 f"deployment.min_devices must be in [0, deployment.devices = {self.devices}], got {self.min_devices}")
        return self


class MonitoringConfig(Settings):
    """Exact per-round figures (update norms, loss, clipped fraction, users, examples, failures, timings)
    are always written to the server-private `RUN/private/` (telemetry.jsonl, events.log, summary.json),
    never to results.json, tensorboard/ or the console. These keys only add views of them for the
    operator."""

    private_tensorboard: bool = False
    """also a separate TensorBoard run of every exact figure in private/tensorboard/ (tags
    `server-private/...`), with a grid of training images (private data: never in the published log)"""
    private_console: bool = False
    """also print server-private events (rejected or missing replies, devices online) on the console, each
    line marked `[server-private]`"""
    wait_progress_s: float = Field(15.0, gt=0)
    """while the server waits for devices to come online or for a round's replies, one server-private line
    this often: the nodes it waits for and until when (UTC). `fedemb deploy run` shows these lines with the
    registered names"""


class PretrainConfig(Settings):
    """`fedemb pretrain`: centralized training on the public users."""

    epochs: int = Field(5, ge=1)
    """epochs over the public users' examples"""
    batch_size: int = Field(64, ge=1)
    """minibatch size"""
    lr: float = Field(0.05, gt=0)
    """SGD learning rate"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum"""


class SynthConfig(Settings):
    """`fedemb synth gmm`: the DP Gaussian mixture, the classifier trained on its samples, and the
    baselines ([synthesis.md](synthesis.md))."""

    epsilon: float = Field(4.0, gt=0)
    """the synthesis stage's own ε (at the run's δ); the ledger composes it with the training"""
    centre: Literal["none", "public"] = "none"
    """none, or public: subtract the public users' mean embedding before normalising"""
    mixture: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: the detail follows the budget, chosen from released class counts (prototypes at low ε,
    up to `clusters` clusters with `covariance` at high ε); fixed: always `clusters` and `covariance`"""
    clusters: int = Field(4, ge=1)
    """mixture components per class (adaptive: the most)"""
    budget_decision: float = Field(0.05, gt=0, lt=1)
    """adaptive: share of the stage's budget for the class counts the detail is chosen from"""
    mean_noise_tolerance: float = Field(0.1, gt=0)
    """adaptive: the most expected noise norm on one cluster's mean (embeddings on the unit sphere) for
    a mixture with that many clusters to be chosen"""
    iterations: int = Field(2, ge=0)
    """DP-Lloyd iterations"""
    init: Literal["mean", "random", "public"] = "mean"
    """mean: random points around a DP class mean; random: data-independent points; public: k-means on
    public users"""
    covariance: Literal["isotropic", "diag", "full", "lowrank"] = "diag"
    """isotropic (no release), diag, full, or lowrank"""
    rank: int = Field(8, ge=1)
    """lowrank: eigenvectors kept, the rest isotropic"""
    eigenvalue_floor: float = Field(1e-4, gt=0)
    """covariances are projected onto the PSD cone with this floor"""
    contribution_bound: float = Field(1.0, gt=0)
    """B: L2 bound of one user's per-cell counts (sensitivities B, B·r, B·r²)"""
    budget_lloyd: float = Field(0.3, ge=0)
    """share of the stage's 1/z² for DP-Lloyd (the shares are normalised to sum to 1)"""
    budget_counts: float = Field(0.1, gt=0)
    """share for the cluster counts"""
    budget_means: float = Field(0.4, gt=0)
    """share for the cluster means"""
    budget_covariances: float = Field(0.2, ge=0)
    """share for the covariances"""
    samples_per_class: int = Field(2000, ge=1)
    """synthetic embeddings per class"""
    project_samples: bool = True
    """put synthetic embeddings back on the unit sphere, like the real ones"""
    mlp_hidden: int = Field(256, ge=1)
    """hidden width of the two-layer MLP (AdamW) trained on the samples"""
    mlp_epochs: int = Field(30, ge=1)
    """its epochs"""
    mlp_lr: float = Field(0.001, gt=0)
    """its learning rate"""
    probe_epochs: int = Field(30, ge=1)
    """the DP-SGD linear-probe baseline (Opacus, one user per sample): epochs"""
    probe_lr: float = Field(2.0, gt=0)
    """its learning rate"""
    probe_batch_users: int = Field(64, ge=1)
    """its expected users per Poisson batch"""
    probe_max_examples: int = Field(256, ge=1)
    """rows per user kept by the probe"""
    probe_clip: float = Field(1.0, gt=0)
    """its per-user clip norm"""
    seed: int = Field(-1, ge=-1)
    """-1: OS randomness; >= 0: reproducible noise, sampling and training (run.seed is not reused)"""

    @model_validator(mode="after")
    def _budgets_cover_releases(self) -> SynthConfig:
        _require(self.covariance == "isotropic" or self.budget_covariances > 0,
                 f"synth.covariance = {self.covariance!r} needs synth.budget_covariances > 0")
        _require(self.clusters == 1 or self.budget_lloyd > 0 or (self.init == "public" and self.iterations == 0),
                 "synth.clusters > 1 needs synth.budget_lloyd > 0 for DP-Lloyd")
        return self


class InvertConfig(Settings):
    """`fedemb synth invert`: DP activation statistics, images inverted from them, and classifiers trained
    on those ([synthesis-images.md](synthesis-images.md)). `fedemb synth custom` takes its settings from
    the task spec's `[synthesis]` table instead."""

    epsilon: float = Field(2.0, gt=0)
    """the stage's own ε (DP activation statistics + DP class prototypes), at the run's δ"""
    statistics: Literal["dp", "batchnorm"] = "dp"
    """dp: release activation statistics; batchnorm: use BatchNorm buffers that travelled inside the
    clipped update (needs `model.batchnorm_in_update`)"""
    layers: str = "input,conv"
    """comma-separated: input (the pixels, per channel), conv (every Conv2d's output), or module names"""
    activation_clip: float = Field(3.0, gt=0)
    """per layer, a = this × the layer's RMS on noise images; channel means clamped to [−a, a], mean
    squares to [0, a²]"""
    contribution_bound: float = Field(1.0, gt=0)
    """B: a user's examples weigh at most B in total"""
    budget_count: float = Field(0.1, ge=0)
    """share of the stage's budget for the example count (the shares are normalised to sum to 1)"""
    budget_means: float = Field(0.3, ge=0)
    """share for the channel means"""
    budget_squares: float = Field(0.3, ge=0)
    """share for the channel mean squares"""
    budget_prototypes: float = Field(0.3, gt=0)
    """share for the class anchors: DP class prototypes, or the DP mixture with `anchors = "mixture"`"""
    anchors: Literal["prototypes", "mixture"] = "prototypes"
    """prototypes: the class term pulls toward DP class prototypes; mixture: a DP Gaussian mixture per
    class (the `[synth]` mixture settings) is released instead, its class means are the anchors and every
    image also gets its own target embedding sampled from it (embedding-guided inversion)"""
    weight_embedding: float = Field(1.0, ge=0)
    """loss weight of the embedding term (anchors = "mixture")"""
    init: Literal["auto", "pixels", "noise"] = "auto"
    """pixels: start from uniform noise around the released mean pixel (needs `input` in `layers`);
    noise: Gaussian noise around mid-grey; auto: pixels when `layers` has `input`, else noise"""
    images_per_class: int = Field(128, ge=1)
    """inverted images per class"""
    batch_per_class: int = Field(32, ge=1)
    """images per class in one optimisation batch (the statistics are matched per batch)"""
    steps: int = Field(500, ge=0)
    """Adam steps"""
    lr: float = Field(0.1, gt=0)
    """Adam learning rate (cosine schedule)"""
    weight_statistics: float = Field(1.0, ge=0)
    """loss weight of the statistics term"""
    weight_class: float = Field(1.0, ge=0)
    """loss weight of the class term"""
    weight_tv: float = Field(0.01, ge=0)
    """loss weight of total variation"""
    weight_l2: float = Field(0.0001, ge=0)
    """loss weight of the pixels' L2 norm"""
    temperature: float = Field(0.1, gt=0)
    """of the class term's softmax over cosine similarities"""
    jitter: int = Field(1, ge=0)
    """random shift per step, in pixels"""
    flip: bool = False
    """random horizontal flips per step (off: a flipped digit is another symbol)"""
    ablation: bool = True
    """also invert without the statistics term, and evaluate on those images"""
    train_epochs: int = Field(60, ge=1)
    """epochs of the fresh classifiers trained on the images"""
    train_lr: float = Field(0.003, gt=0)
    """their learning rate"""
    train_affine: float = Field(1.0, ge=0)
    """their augmentation besides 1-pixel shifts: random rotations up to ±15° and scalings up to ±15%,
    times this (0: shifts only)"""
    distill_temperature: float = Field(0.1, gt=0)
    """the teacher's (private model's) prototype softmax"""
    seed: int = Field(-1, ge=-1)
    """-1: OS randomness for the noise"""

    @field_validator("layers")
    @classmethod
    def _layers_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'conv' or module names")
        return value

    @model_validator(mode="after")
    def _statistics_budgeted(self) -> InvertConfig:
        if self.statistics == "dp":
            _require(min(self.budget_count, self.budget_means, self.budget_squares) > 0,
                     "invert.budget_count, budget_means and budget_squares must be > 0 for DP statistics")
        return self


class Config(Settings):
    """A run config: a TOML file with these sections; every key is optional."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    invert: InvertConfig = Field(default_factory=InvertConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        """Checks across sections that need no data (k against the users is checked when the data loads)."""
        p, s = self.privacy, self.sampling
        _check_projection(self)
        if p.enabled and p.mechanism == "gaussian" and s.method == "limited":
            raise ValueError("sampling.method = 'limited' gives no amplification by sampling, which the sampled "
                             "Gaussian accountant assumes; use privacy.mechanism = 'tree' (DP-FTRL) with it")
        if p.enabled and p.mechanism == "gaussian" and s.method == "fixed" and p.fixed_size_accounting == "refuse":
            raise ValueError(
                "sampling.method = 'fixed' breaks the Poisson-sampling assumption of the accountant; "
                "use Poisson sampling, or set privacy.fixed_size_accounting = 'no_amplification' "
                "to account every round as if every user took part (no amplification by sampling)")
        if self.deployment.devices and s.users_per_client != 1:
            raise ValueError(
                f"deployment.devices is set, so each virtual client is one device (one user): "
                f"sampling.users_per_client must be 1, got {s.users_per_client} "
                "(a virtual client of k users trains on their pooled data, which devices never share)")
        if self.deployment.devices and s.virtual_clients:
            raise ValueError("deployment.devices sets the denominator (round(q x devices)); "
                             "leave sampling.virtual_clients at 0")
        return self


def _check_projection(cfg: Config) -> None:
    pr, p, s = cfg.privacy.projection, cfg.privacy, cfg.sampling
    if not pr.population:
        return
    _require(1 <= pr.cohort <= pr.population,
             f"privacy.projection.cohort must be in [1, population = {pr.population}], got {pr.cohort}")
    _require(pr.cohort >= s.users_per_client,
             f"privacy.projection.cohort = {pr.cohort} is smaller than sampling.users_per_client = {s.users_per_client}")
    _require(p.enabled and p.mechanism == "gaussian" and s.method == "poisson" and p.clipping == "fixed",
             "privacy.projection needs the sampled Gaussian with Poisson sampling and fixed clipping")
    _require(p.target_epsilon > 0 and p.calibrate_noise,
             "privacy.projection calibrates the noise for privacy.target_epsilon: set it (> 0) and keep calibrate_noise")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = read_toml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


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
    return parse(Config, raw)


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
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set_key(raw, key, value)
    else:
        for item in overrides:
            apply_override(raw, item)
    return config_from_dict(raw)


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def to_dict(cfg: Settings) -> dict[str, Any]:
    return cfg.model_dump()


def to_toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))
