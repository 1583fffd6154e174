"""The server step: the noisy mean Δ is treated as a gradient for torch's SGD with momentum."""

from __future__ import annotations

import torch


class ServerOptimizer:
    def __init__(self, state: dict[str, torch.Tensor], lr: float, momentum: float):
        self.params = {k: torch.nn.Parameter(v.detach().clone().to(torch.float32), requires_grad=False)
                       for k, v in state.items()}
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=lr, momentum=momentum)

    def step(self, mean_delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k, p in self.params.items():
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
