"""The DP mechanism of a round: what clients clip to, the noise the server adds to their clipped sum,
and the ledger entry that accounts for it. The strategy composes one of these with a sampler, the
ledger and the server optimizer; it does not branch on which one it has. It hands the mechanism the
clipped sum and the round's exact counts (RoundCounts); the mechanism owns the noise std and what it
releases of the counts, divided by M (the run's virtual-client slots, RunSetup.virtual_clients).

- SampledGaussian: N(0, (z·C)²) on the sum, fixed C or adaptive C (with its noised clipped-count query),
  optionally with DP training metrics (a noised sum of bounded losses and a noised clipped count).
  The scalar queries and the update are one Gaussian mechanism: the update noise grows so that the
  joint noise multiplier stays the accountant's z.
- TreeAggregation: DP-FTRL; the released sum is the difference of consecutive noisy prefix sums.
- NoPrivacy: no clipping, no noise (the non-private baseline); its ledger entries say ε = ∞.
"""

from __future__ import annotations

from fedemb.privacy.accountant import PrivacyPlan
from dataclasses import dataclass

from fedemb.errors import ConfigError
from fedemb.monitoring.metric_names import (CLIP_NORM, DP_FRACTION_CLIPPED, DP_TRAIN_LOSS, EFFECTIVE_NOISE_MULTIPLIER,
                                            NOISE_STD, UNCLIPPED_FRACTION_ESTIMATE)
from fedemb.privacy.adaptive_clipping import AdaptiveClipping
from fedemb.privacy.clipping import Update
from fedemb.privacy.ledger import SAMPLED_GAUSSIAN, TREE, ZERO_OUT, LedgerEntry
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.tree_accountant import equivalent_noise_multiplier
from fedemb.privacy.tree_noise import TreeNoise

STAGE = "training"
CENTRED_UNCLIPPED = "centred-unclipped"  # Σ over accepted virtual clients of (1 if unclipped else 0) − ½
CENTRED_LOSS = "centred-loss"  # Σ over accepted virtual clients of (min(max(loss, 0), B) − B/2)


@dataclass(frozen=True)
class RoundCounts:
    """The exact counts of a round's accepted replies (server-side only), as the strategy summed them.
    What a mechanism releases of them, and how, is the mechanism's: it centres them (CENTRED_*) here."""
    accepted: float  # virtual clients whose updates are in the sum
    clipped: float  # of those, the ones whose update was clipped
    bounded_loss_sum: float = 0.0  # Σ of their mean losses clamped to [0, B] (privacy.metrics)

    @property
    def centred_unclipped(self) -> float:
        return (self.accepted - self.clipped) - self.accepted / 2

    def centred_loss(self, loss_bound: float) -> float:
        return self.bounded_loss_sum - self.accepted * loss_bound / 2


@dataclass(frozen=True)
class ScalarQuery:
    """A centred sum over the round's virtual clients, released with Gaussian noise of `std`."""
    name: str
    sensitivity: float
    std: float
    setting: str  # the config key that sets its noise


METRIC_BUDGET_SHARE = 0.01  # at most this share of a round's 1/z² per default DP training metric


def metric_noise_std(sensitivity: float, by_cohort: float, plan: PrivacyPlan) -> float:
    """The default noise of a DP training metric: `by_cohort` (a fixed error of the released mean), or
    more where that would take over METRIC_BUDGET_SHARE of the round's budget (small cohorts)."""
    return max(by_cohort, sensitivity * plan.accounting_noise_multiplier / METRIC_BUDGET_SHARE ** 0.5)


def training_metrics(centred_unclipped: float, centred_loss: float, virtual_clients: int, loss_bound: float
                     ) -> dict[str, float]:
    """The published training metrics from the (released) centred sums, divided by M, never by what arrived."""
    return {DP_TRAIN_LOSS: centred_loss / virtual_clients + loss_bound / 2,
            DP_FRACTION_CLIPPED: 0.5 - centred_unclipped / virtual_clients}


def joint_update_noise_multiplier(accounting_z: float, queries: list[ScalarQuery]) -> float:
    """The update's noise multiplier (std / its sensitivity) that keeps the update and the scalar
    queries together one Gaussian mechanism with noise multiplier `accounting_z`:
    (1/z_update)² + Σ (S_j/σ_j)² = 1/z²."""
    if accounting_z == 0 or not queries:
        return accounting_z
    spare = accounting_z ** -2 - sum((q.sensitivity / q.std) ** 2 for q in queries)
    if spare <= 0:
        settings = " and ".join(f"{q.setting} = {q.std:g}" for q in queries)
        raise ConfigError(f"{settings} leave no budget for the update at noise multiplier {accounting_z:g}: "
                          f"the round's scalar queries alone would spend it (raise their noise)")
    return spare ** -0.5


class RoundMechanism:
    name = ""
    clip_norm = 0.0  # what clients clip to in the coming round; 0: no clipping
    virtual_clients = 0  # M, by which released counts are divided; 0: the mechanism divides nothing
    # what the server step multiplies the last noisy mean update by (post-processing of released values)
    step_scale = 1.0
    sum_noise_std = 0.0  # the noise std on the clipped sum at the initial C (what sets the server step)

    def ledger_entry(self, server_round: int, attempt: int) -> LedgerEntry:
        raise NotImplementedError

    def privatize(self, total: Update, counts: RoundCounts) -> Update:
        """The noisy clipped sum. `counts`: the round's exact counts, for mechanisms that release
        scalar queries of them (the centred sums CENTRED_*, noised with the update)."""
        raise NotImplementedError

    def round_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoPrivacy(RoundMechanism):
    name = "none"

    def __init__(self, virtual_clients: int = 1, metrics=None):
        self.virtual_clients = virtual_clients  # M
        self.metrics = metrics if metrics is not None and metrics.enabled else None
        self._last: dict = {}

    def ledger_entry(self, server_round, attempt):
        return LedgerEntry(STAGE, f"round {server_round}", "unclipped, noiseless sum (not private)",
                           {"kind": "none"}, round=server_round, attempt=attempt)

    def privatize(self, total, counts):
        self._last = {}
        if self.metrics:  # not private anyway (ε = ∞ in the ledger): the same estimates, without noise
            bound = self.metrics.loss_bound
            self._last = training_metrics(counts.centred_unclipped, counts.centred_loss(bound), self.virtual_clients,
                                          bound)
        return {k: v.clone() for k, v in total.items()}

    def round_metrics(self):
        return {NOISE_STD: 0.0, **self._last}


class SampledGaussian(RoundMechanism):
    def __init__(self, plan: PrivacyPlan, clip_norm: float, noise: GaussianNoise, virtual_clients: int,
                 adaptive: AdaptiveClipping | None = None, metrics=None):
        self.plan = plan
        self.noise = noise
        self.virtual_clients = virtual_clients  # M: the released counts are divided by it
        self.adaptive = adaptive
        self.metrics = metrics if metrics is not None and metrics.enabled else None
        self.fixed_clip_norm = clip_norm
        self.name = SAMPLED_GAUSSIAN + ("+adaptive_clipping" if adaptive else "") + ("+metrics" if self.metrics else "")
        # a centred count moves by ½ (a k = 1 client comes or goes) or 1 (a bit flips); a centred loss
        # clamped to [0, B] by B/2 or B
        self.count_sensitivity = plan.sensitivity / 2
        self.queries: list[ScalarQuery] = []
        if adaptive or self.metrics:
            setting = "privacy.adaptive.count_noise_std" if adaptive else "privacy.metrics.count_noise_std"
            count_std = adaptive.count_std if adaptive else (
                self.metrics.count_noise_std or metric_noise_std(self.count_sensitivity, virtual_clients / 20, plan))
            self.queries.append(ScalarQuery(CENTRED_UNCLIPPED, self.count_sensitivity, count_std, setting))
        if self.metrics:
            bound = self.metrics.loss_bound
            loss_sensitivity = plan.sensitivity * bound / 2
            self.queries.append(ScalarQuery(
                CENTRED_LOSS, loss_sensitivity,
                self.metrics.loss_noise_std or metric_noise_std(loss_sensitivity, bound * virtual_clients / 40, plan),
                "privacy.metrics.loss_noise_std"))
        self.update_z = joint_update_noise_multiplier(plan.accounting_noise_multiplier, self.queries)
        self._last: dict = {}

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.fixed_clip_norm

    @property
    def update_std(self) -> float:
        return self.update_z * self.plan.sensitivity * self.clip_norm

    @property
    def sum_noise_std(self) -> float:
        return self.update_z * self.plan.sensitivity * self.fixed_clip_norm

    def ledger_entry(self, server_round, attempt):
        details = {"clip_norm": self.clip_norm, "noise_std": self.update_std}
        if self.queries:
            details |= {"update_noise_multiplier": self.update_z,
                        "scalar_queries": [{"name": q.name, "sensitivity": q.sensitivity, "noise_std": q.std}
                                           for q in self.queries]}
        if self.adaptive:
            details |= {"count_noise_std": self.adaptive.count_std, "count_sensitivity": self.count_sensitivity}
        return LedgerEntry(STAGE, f"round {server_round}", self.name,
                           {"kind": SAMPLED_GAUSSIAN, "z": self.plan.accounting_noise_multiplier,
                            "q": self.plan.sampling_rate, "steps": 1},
                           round=server_round, sampling_rate=self.plan.sampling_rate,
                           noise_multiplier=self.plan.accounting_noise_multiplier,
                           sensitivity=self.plan.sensitivity * self.clip_norm, attempt=attempt, details=details)

    def privatize(self, total, counts):
        clip, std = self.clip_norm, self.update_std
        noisy = self.noise.add(total, std)
        self._last = {CLIP_NORM: clip, NOISE_STD: std, EFFECTIVE_NOISE_MULTIPLIER: std / clip if clip else 0.0}
        exact = {CENTRED_UNCLIPPED: counts.centred_unclipped}
        if self.metrics:
            exact[CENTRED_LOSS] = counts.centred_loss(self.metrics.loss_bound)
        released = {q.name: exact[q.name] + self.noise.draw_scalar(q.std) for q in self.queries}
        m = self.virtual_clients
        if self.adaptive:
            self.step_scale = self.adaptive.step_scale(self.fixed_clip_norm)
            self._last[UNCLIPPED_FRACTION_ESTIMATE] = self.adaptive.update(released[CENTRED_UNCLIPPED], m)
        if self.metrics:
            self._last |= training_metrics(released[CENTRED_UNCLIPPED], released[CENTRED_LOSS], m,
                                           self.metrics.loss_bound)
        return noisy

    def round_metrics(self):
        return dict(self._last)

    def state_dict(self):
        return {"noise": self.noise.state_dict(), "adaptive": self.adaptive.state_dict() if self.adaptive else None}

    def load_state_dict(self, state):
        self.noise.load_state_dict(state["noise"])
        if self.adaptive and state.get("adaptive"):
            self.adaptive.load_state_dict(state["adaptive"])


class TreeAggregation(RoundMechanism):
    name = "tree_aggregation"

    def __init__(self, plan: PrivacyPlan, clip_norm: float, noise: GaussianNoise):
        self.plan = plan
        self.clip_norm = clip_norm
        self.tree = TreeNoise(plan.noise_multiplier * clip_norm, noise, plan.restart_every)
        self.noise = noise
        self.sum_noise_std = self.tree.std

    def ledger_entry(self, server_round, attempt):
        z_eq = equivalent_noise_multiplier(self.plan.accounting_noise_multiplier, server_round, self.plan.limits,
                                           self.plan.restart_every)
        return LedgerEntry(STAGE, f"round {server_round}", self.name,
                           {"kind": TREE, "key": f"{STAGE}/attempt-{attempt}", "z": z_eq},
                           round=server_round, sampling_rate=1.0,
                           noise_multiplier=self.plan.accounting_noise_multiplier,
                           sensitivity=self.plan.sensitivity * self.clip_norm, attempt=attempt,
                           neighbouring=ZERO_OUT,  # the same users take part; one user's data is zeroed out
                           details={"clip_norm": self.clip_norm, "node_noise_std": self.tree.std,
                                    "equivalent_noise_multiplier": z_eq,
                                    "min_separation": self.plan.limits.min_separation,
                                    "max_participations": self.plan.limits.max_participations,
                                    "restart_every": self.plan.restart_every})

    def privatize(self, total, counts):
        return self.tree.residual(total)

    def round_metrics(self):
        return {CLIP_NORM: self.clip_norm, NOISE_STD: self.tree.std,
                EFFECTIVE_NOISE_MULTIPLIER: self.plan.noise_multiplier}

    def state_dict(self):
        # the tree's node noise is state the prefix sums depend on: it is kept even for OS-seeded noise
        # (server-private; a finished run deletes it unless run.keep_private_state)
        return {"noise": self.noise.state_dict(), "tree": self.tree.state_dict()}

    def load_state_dict(self, state):
        self.noise.load_state_dict(state["noise"])
        self.tree.load_state_dict(state["tree"])


def make_mechanism(cfg, plan: PrivacyPlan, noise: GaussianNoise, virtual_clients: int) -> RoundMechanism:
    """`virtual_clients`: M, the run's slots per round (RunSetup.virtual_clients), by which released
    counts are divided."""
    p = cfg.privacy
    if not p.enabled:
        return NoPrivacy(virtual_clients, p.metrics)
    if p.mechanism == "tree":
        return TreeAggregation(plan, p.clip_norm, noise)
    adaptive = None
    if p.clipping == "adaptive":
        a = p.adaptive
        adaptive = AdaptiveClipping(p.clip_norm, a.target_quantile, a.learning_rate,
                                    a.count_noise_std or virtual_clients / 20, a.scale_server_step)
    return SampledGaussian(plan, p.clip_norm, noise, virtual_clients, adaptive, p.metrics)
