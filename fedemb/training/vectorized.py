"""Train several virtual clients at once: torch.func.vmap over stacked per-client weights.

Each virtual client keeps exactly what sequential training gives it (fedemb.training.local): its own
example schedule, head (same initial draw), SGD-with-momentum state for body and head, warm-up phases
and learning rates. The clients of a group advance step by step together:

- ragged data is masked: a client's last, shorter batch is padded with examples that weigh 0, and a
  client that has run out of steps keeps its weights and momentum unchanged (the update is gated);
- local heads of different widths are padded to the widest; the padded classes get logit −1e30, so
  they take no probability and no gradient.

The result equals training the clients one by one up to float rounding (tested). A model that vmap
cannot batch (e.g. BatchNorm updating its statistics in place) falls back to sequential training,
with a log line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedemb.data.population import Population
from fedemb.models.embedding_net import EmbeddingNet, shared_state
from fedemb.training.local import LocalResult, LocalTrainingConfig, example_schedule, make_head, train_virtual_client

log = logging.getLogger("fedemb")
MASKED_LOGIT = -1e30
GROUP_MEMORY_BYTES = 2**30
_refused: dict[str, str] = {}  # model -> why vmap could not batch it (decided once per process)
_capped: set[str] = set()  # models whose group size was capped (logged once per process)


def group_size_within_memory(num_parameters: int, group_size: int, budget_bytes: int = GROUP_MEMORY_BYTES) -> int:
    """The largest group whose stacked weights, gradients, momentum and update (4 float32 copies per
    client) fit the budget: vmap over 50 copies of an 11M-parameter model would need ~9 GB."""
    return max(1, min(group_size, budget_bytes // max(1, 16 * num_parameters)))


def train_virtual_clients(net: EmbeddingNet, pop: Population, clients: list[tuple[int, ...]],
                          cfg: LocalTrainingConfig, seeds: list[int], anchors: torch.Tensor | None,
                          group_size: int, model_key: str = "") -> Iterator[LocalResult | None]:
    """Results in the order of `clients` (None where a client's training raised); groups of up to
    `group_size` train together (bucketed by their number of steps, so little is wasted on padding).
    One by one, each result is made when it is asked for, so a node holds one Δ at a time; vectorized,
    the node holds the Δs of all its clients until they are summed (groups run in step-count order)."""
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    capped = group_size_within_memory(sum(p.numel() for p in net.parameters()), group_size)
    if capped < group_size and group_size >= 2 and model_key not in _capped:
        _capped.add(model_key)
        log.warning("client.vectorize = %s would not fit %.1f GiB for this model; training groups of %s",
                    group_size, GROUP_MEMORY_BYTES / 2**30, capped)
    group_size = capped
    if group_size < 2 or len(clients) < 2 or model_key in _refused or cfg.head == "shared":
        return _sequential(net, pop, clients, cfg, seeds, anchors, initial)
    prepared = [_prepare(net, pop, users, cfg, seed, anchors) for users, seed in zip(clients, seeds)]
    order = sorted(range(len(clients)), key=lambda i: len(prepared[i]["schedule"]))
    results: list[LocalResult | None] = [None] * len(clients)
    for start in range(0, len(order), group_size):
        group = order[start:start + group_size]
        try:
            group_results = _train_group(net, pop, [prepared[i] for i in group], cfg, initial)
        except (RuntimeError, NotImplementedError) as exc:
            _refused[model_key] = str(exc).splitlines()[0]
            log.warning("vectorized training is not possible for this model (%s); training virtual clients "
                        "one by one", _refused[model_key])
            return _sequential(net, pop, clients, cfg, seeds, anchors, initial)
        for i, result in zip(group, group_results):
            results[i] = result
    net.load_state_dict(initial)
    return iter(results)


def _sequential(net, pop, clients, cfg, seeds, anchors, initial) -> Iterator[LocalResult | None]:
    """None for a client whose training raised: one broken client must not cost the others."""
    for users, seed in zip(clients, seeds):
        net.load_state_dict(initial)
        try:
            result = train_virtual_client(net, pop, users, cfg, seed, anchors)
        except Exception as exc:  # noqa: BLE001 - any failure of one client's training is isolated
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            log.warning("training the virtual client of users %s failed: %s", list(users[:4]), reason)
            result = None
        yield result
    net.load_state_dict(initial)


def _prepare(net, pop, users, cfg, seed, anchors) -> dict:
    """What sequential training would draw for this client, in the same order from the same seeds."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    schedule = example_schedule(pop, users, cfg.epochs, cfg.max_examples, rng)
    if len(schedule) == 0:
        return {"schedule": schedule}
    head, targets = make_head(net.embedding.out_features, pop.labels[schedule], cfg, anchors)
    return {"schedule": schedule, "head": head.weight.detach().clone(), "targets": np.asarray(targets)}


def _train_group(net, pop, clients: list[dict], cfg: LocalTrainingConfig, initial: dict) -> list[LocalResult]:
    trainable = [c for c in clients if len(c["schedule"])]
    results = {}
    if trainable:
        results = _train_trainable(net, pop, trainable, cfg, initial)
    zero = {k: torch.zeros_like(v) for k, v in shared_state(net).items()}
    return [results.get(id(c), LocalResult({k: v.clone() for k, v in zero.items()}, 0, 0.0)) for c in clients]


def _train_trainable(net, pop, clients, cfg, initial) -> dict:
    n = len(clients)
    batch = cfg.batch_size
    steps = [-(-len(c["schedule"]) // batch) for c in clients]
    width = max(c["head"].shape[0] for c in clients)
    emb_dim = clients[0]["head"].shape[1]
    head = torch.zeros(n, width, emb_dim)
    class_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, c in enumerate(clients):
        head[i, :c["head"].shape[0]] = c["head"]
        class_mask[i, :c["head"].shape[0]] = True
    names = [name for name, _ in net.named_parameters()]
    body = {name: initial[name].unsqueeze(0).repeat(n, *([1] * initial[name].dim())) for name in names}
    buffers = {name: b for name, b in net.named_buffers()}
    body_buf = {name: torch.zeros_like(p) for name, p in body.items()}
    head_buf = torch.zeros_like(head)

    def loss_fn(params, head_w, x, y, mask, classes):
        emb = functional_call(net, (params, buffers), (x,))
        logits = (emb @ head_w.T).masked_fill(~classes, MASKED_LOGIT)
        ce = F.cross_entropy(logits, y, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    step_fn = vmap(grad_and_value(loss_fn, argnums=(0, 1)))
    image_shape = tuple(pop.images.shape[1:])
    loss_sums = torch.zeros(n, dtype=torch.float64)
    net.train()
    for t in range(max(steps)):
        x = torch.zeros((n, batch) + image_shape)
        y = torch.zeros(n, batch, dtype=torch.long)
        mask = torch.zeros(n, batch)
        active = torch.tensor([t < s for s in steps])
        for i, c in enumerate(clients):
            rows = c["schedule"][t * batch:(t + 1) * batch]
            if len(rows):
                x[i, :len(rows)] = pop.tensor(rows)
                y[i, :len(rows)] = torch.from_numpy(c["targets"][t * batch:(t + 1) * batch])
                mask[i, :len(rows)] = 1.0
        (g_body, g_head), loss = step_fn(body, head, x, y, mask, class_mask)
        loss_sums += torch.where(active, loss.detach().double(), torch.zeros_like(loss_sums))
        train_body = cfg.head_warmup_steps == 0 or t >= cfg.head_warmup_steps
        train_head = cfg.head_warmup_steps == 0 or t < cfg.head_warmup_steps
        if train_body:
            for name in names:
                body_buf[name], body[name] = _sgd(body[name], body_buf[name], g_body[name], cfg.lr, cfg.momentum, active)
        if train_head:
            head_buf, head = _sgd(head, head_buf, g_head, cfg.lr * cfg.head_lr_scale, cfg.momentum, active)
    shared = [k for k in shared_state(net)]
    out = {}
    for i, c in enumerate(clients):
        trained = {**initial, **{name: body[name][i] for name in names}}
        delta = {k: initial[k] - trained[k] for k in shared}
        out[id(c)] = LocalResult(delta, len(c["schedule"]), float(loss_sums[i] / steps[i]))
    return out


def _sgd(param, buf, grad, lr, momentum, active):
    """torch.optim.SGD's step (momentum, no dampening) for the active clients only."""
    gate = active.view(-1, *([1] * (param.dim() - 1)))
    new_buf = buf * momentum + grad
    new_param = param - lr * new_buf
    return torch.where(gate, new_buf, buf), torch.where(gate, new_param, param)
