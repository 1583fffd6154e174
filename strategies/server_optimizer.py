"""The server step: the noisy mean Δ is treated as a gradient for torch's SGD with momentum.

With DP each step also moves the model by the noise on the mean update, whose expected norm is
σ·√d / M (σ: the noise std on the sum, d: shared parameters, M: virtual clients per round). A step
size that suits ε = 8 lets that noise walk the model away at ε = 1 (docs/results.md, "Training
utility"). `noise_limited_lr` lowers the step, once, from the config alone: lr × the noise's expected
norm is kept at most `limit` × C, so one default trains at every ε.
"""

from __future__ import annotations

import math

import torch

from fedemb.models.embedding_net import update_keys


def noise_to_clip_ratio(sum_noise_std: float, num_parameters: int, virtual_clients: int, clip_norm: float) -> float:
    """r: the expected norm of the noise on the mean update, in units of C (a data-independent constant)."""
    if sum_noise_std <= 0 or clip_norm <= 0:
        return 0.0
    return sum_noise_std * math.sqrt(num_parameters) / (virtual_clients * clip_norm)


def noise_limited_lr(lr: float, limit: float, ratio: float) -> float:
    """min(lr, limit / r); `limit` 0 (or no noise): lr."""
    if limit <= 0 or ratio <= 0:
        return lr
    return min(lr, limit / ratio)


class ServerOptimizer:
    """Holds the whole model; steps the `update_keys` (model.train_only; default all), the only ones
    the clients' updates cover."""

    def __init__(self, state: dict[str, torch.Tensor], lr: float, momentum: float, update_keys=None):
        self.lr = lr
        self.params = {k: torch.nn.Parameter(v.detach().clone().to(torch.float32), requires_grad=False)
                       for k, v in state.items()}
        self.update_keys = tuple(update_keys) if update_keys is not None else tuple(self.params)
        self.optimizer = torch.optim.SGD([self.params[k] for k in self.update_keys], lr=lr, momentum=momentum)

    def step(self, mean_delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k in self.update_keys:
            p = self.params[k]
            p.grad = mean_delta[k].to(p.dtype)
        self.optimizer.step()
        return self.state()

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def state_dict(self) -> dict:
        return {"params": self.state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])


def make_server_optimizer(cfg, state: dict[str, torch.Tensor], mechanism, virtual_clients: int) -> ServerOptimizer:
    """server.lr, lowered by server.noise_step_limit for the run's noise (mechanism.sum_noise_std at
    privacy.clip_norm, over the parameters the updates cover)."""
    keys = update_keys(state, cfg.model.train_only)
    ratio = noise_to_clip_ratio(mechanism.sum_noise_std, sum(state[k].numel() for k in keys), virtual_clients,
                                cfg.privacy.clip_norm)
    lr = noise_limited_lr(cfg.server.lr, cfg.server.noise_step_limit, ratio)
    return ServerOptimizer(state, lr, cfg.server.momentum, keys)
