"""The DP mechanism of a round: what clients clip to, the noise the server adds to their clipped sum,
and the ledger entry that accounts for it. The strategy composes one of these with a sampler, the
ledger and the server optimizer; it does not branch on which one it has.

- SampledGaussian: N(0, (z·C)²) on the sum, fixed C or adaptive C (with its noised clipped-count query).
- TreeAggregation: DP-FTRL; the released sum is the difference of consecutive noisy prefix sums.
- NoPrivacy: no clipping, no noise (the non-private baseline); its ledger entries say ε = ∞.
"""

from __future__ import annotations

from fedemb.privacy.accountant import PrivacyPlan
from fedemb.privacy.adaptive_clipping import AdaptiveClipping, update_noise_multiplier
from fedemb.privacy.clipping import Update
from fedemb.privacy.ledger import SAMPLED_GAUSSIAN, TREE, LedgerEntry
from fedemb.privacy.noise import GaussianNoise
from fedemb.privacy.tree_accountant import equivalent_noise_multiplier
from fedemb.privacy.tree_noise import TreeNoise

STAGE = "training"


class RoundMechanism:
    name = ""
    clip_norm = 0.0  # what clients clip to in the coming round; 0: no clipping

    def ledger_entry(self, server_round: int, attempt: int) -> LedgerEntry:
        raise NotImplementedError

    def privatize(self, total: Update, centred_unclipped: float) -> Update:
        """The noisy clipped sum. `centred_unclipped` = Σ over accepted virtual clients of
        (1 if unclipped else 0) − ½, for mechanisms that query it."""
        raise NotImplementedError

    def round_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoPrivacy(RoundMechanism):
    name = "none"

    def ledger_entry(self, server_round, attempt):
        return LedgerEntry(STAGE, f"round {server_round}", "unclipped, noiseless sum (not private)",
                           {"kind": "none"}, round=server_round, attempt=attempt)

    def privatize(self, total, centred_unclipped):
        return {k: v.clone() for k, v in total.items()}

    def round_metrics(self):
        return {"noise-std": 0.0}


class SampledGaussian(RoundMechanism):
    def __init__(self, plan: PrivacyPlan, clip_norm: float, noise: GaussianNoise, expected_clients: int,
                 adaptive: AdaptiveClipping | None = None):
        self.plan = plan
        self.noise = noise
        self.expected_clients = expected_clients
        self.adaptive = adaptive
        self.fixed_clip_norm = clip_norm
        self.name = SAMPLED_GAUSSIAN + ("+adaptive_clipping" if adaptive else "")
        # the count of unclipped virtual clients moves by ½ (a k = 1 client comes or goes) or 1 (a bit flips)
        self.count_sensitivity = plan.sensitivity / 2
        self.update_z = (update_noise_multiplier(plan.accounting_noise_multiplier, self.count_sensitivity,
                                                 adaptive.count_std) if adaptive else plan.accounting_noise_multiplier)
        self._last: dict = {}

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.fixed_clip_norm

    @property
    def update_std(self) -> float:
        return self.update_z * self.plan.sensitivity * self.clip_norm

    def ledger_entry(self, server_round, attempt):
        details = {"clip_norm": self.clip_norm, "noise_std": self.update_std}
        if self.adaptive:
            details |= {"count_noise_std": self.adaptive.count_std, "count_sensitivity": self.count_sensitivity,
                        "update_noise_multiplier": self.update_z}
        return LedgerEntry(STAGE, f"round {server_round}", self.name,
                           {"kind": SAMPLED_GAUSSIAN, "z": self.plan.accounting_noise_multiplier,
                            "q": self.plan.sampling_rate, "steps": 1},
                           round=server_round, sampling_rate=self.plan.sampling_rate,
                           noise_multiplier=self.plan.accounting_noise_multiplier,
                           sensitivity=self.plan.sensitivity * self.clip_norm, attempt=attempt, details=details)

    def privatize(self, total, centred_unclipped):
        clip, std = self.clip_norm, self.update_std
        noisy = self.noise.add(total, std)
        self._last = {"clip-norm": clip, "noise-std": std, "effective-noise-multiplier": std / clip if clip else 0.0}
        if self.adaptive:
            noisy_count = centred_unclipped + self.noise.draw_scalar(self.adaptive.count_std)
            self._last["unclipped-fraction-estimate"] = self.adaptive.update(noisy_count, self.expected_clients)
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

    def ledger_entry(self, server_round, attempt):
        z_eq = equivalent_noise_multiplier(self.plan.accounting_noise_multiplier, server_round, self.plan.limits,
                                           self.plan.restart_every)
        return LedgerEntry(STAGE, f"round {server_round}", self.name,
                           {"kind": TREE, "key": f"{STAGE}/attempt-{attempt}", "z": z_eq},
                           round=server_round, sampling_rate=1.0,
                           noise_multiplier=self.plan.accounting_noise_multiplier,
                           sensitivity=self.plan.sensitivity * self.clip_norm, attempt=attempt,
                           details={"clip_norm": self.clip_norm, "node_noise_std": self.tree.std,
                                    "equivalent_noise_multiplier": z_eq,
                                    "min_separation": self.plan.limits.min_separation,
                                    "max_participations": self.plan.limits.max_participations,
                                    "restart_every": self.plan.restart_every})

    def privatize(self, total, centred_unclipped):
        return self.tree.residual(total)

    def round_metrics(self):
        return {"clip-norm": self.clip_norm, "noise-std": self.tree.std,
                "effective-noise-multiplier": self.plan.noise_multiplier}

    def state_dict(self):
        # the tree's node noise is state the prefix sums depend on: it is kept even for OS-seeded noise
        return {"noise": self.noise.state_dict(), "tree": self.tree.state_dict()}

    def load_state_dict(self, state):
        self.noise.load_state_dict(state["noise"])
        self.tree.load_state_dict(state["tree"])


def make_mechanism(cfg, plan: PrivacyPlan, noise: GaussianNoise, expected_clients: int) -> RoundMechanism:
    p = cfg.privacy
    if not p.enabled:
        return NoPrivacy()
    if p.mechanism == "tree":
        return TreeAggregation(plan, p.clip_norm, noise)
    adaptive = None
    if p.clipping == "adaptive":
        a = p.adaptive
        adaptive = AdaptiveClipping(p.clip_norm, a.target_quantile, a.learning_rate,
                                    a.count_noise_std or expected_clients / 20)
    return SampledGaussian(plan, p.clip_norm, noise, expected_clients, adaptive)
