"""Train several virtual clients at once over stacked per-client weights.

Each virtual client keeps exactly what sequential training gives it (fedemb.training.local): its own
example schedule, head (same initial draw), SGD-with-momentum state for body and head, warm-up phases
and learning rates. The clients of a group advance step by step together:

- ragged data is masked: a client's last, shorter batch is padded with examples that weigh 0, and a
  client that has run out of steps keeps its weights and momentum unchanged (the update is gated);
- local heads of different widths are padded to the widest; the padded classes get logit −1e30, so
  they take no probability and no gradient.

Two formulations compute a step's per-client gradients, the first that the model allows:

- stacked (fedemb.training.stacked): one forward and backward of plain autograd over the group's batch,
  each layer with parameters applying every client's own weights (a convolution is one grouped
  convolution). What makes a group cheaper than its clients one by one on CPU; it is checked once per
  model and process against the net's own forward (same output for a client, no random draws);
- vmap: torch.func.vmap of the per-client gradient, for any model whose layers vmap can batch.

The result equals training the clients one by one up to float rounding (tested). A model neither can
batch (e.g. BatchNorm updating its statistics in place) falls back to sequential training, with a log
line saying why. Tensors live on the device of the net's parameters; the Δs are returned on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedemb.data.population import Population
from fedemb.models.embedding_net import EmbeddingNet, update_state
from fedemb.training.local import LocalResult, LocalTrainingConfig, example_schedule, make_head, train_virtual_client
from fedemb.training.logits import class_logits
from fedemb.training.stacked import stacked, unsupported

log = logging.getLogger("fedemb")
MASKED_LOGIT = -1e30
GROUP_MEMORY_BYTES = 2**30
FORMULATIONS = ("stacked", "vmap")
_refused: dict[tuple[str, str], str] = {}  # (formulation, model) -> why it could not run (once per process)
_verified: set[str] = set()  # models whose stacked forward matched the net's own in this process
_capped: set[str] = set()  # models whose group size was capped (logged once per process)

# A step: (body, head, x, y, mask, classes, want_body, want_head) -> (body grads | None, head grad | None, losses).
# x holds the group's batch example-major (row b·N + n is example b of client n); y, mask are (B, N).
Step = Callable[..., tuple[dict[str, torch.Tensor] | None, torch.Tensor | None, torch.Tensor]]


class NotStackable(RuntimeError):
    """The stacked forward cannot stand for this model's own (it differs, or it draws random numbers)."""


def group_size_within_memory(num_parameters: int, group_size: int, budget_bytes: int = GROUP_MEMORY_BYTES) -> int:
    """The largest group whose stacked weights, gradients, momentum and update (4 float32 copies per
    client) fit the budget: vmap over 50 copies of an 11M-parameter model would need ~9 GB."""
    return max(1, min(group_size, budget_bytes // max(1, 16 * num_parameters)))


def train_virtual_clients(net: EmbeddingNet, pop: Population, clients: list[tuple[int, ...]],
                          cfg: LocalTrainingConfig, seeds: list[int], anchors: torch.Tensor | None,
                          group_size: int, model_key: str = "",
                          formulations: tuple[str, ...] = FORMULATIONS) -> Iterator[LocalResult | None]:
    """Results in the order of `clients` (None where a client's training raised); groups of up to
    `group_size` train together (bucketed by their number of steps, so little is wasted on padding),
    with the first of `formulations` that the model allows (a benchmark may ask for one alone).
    One by one, each result is made when it is asked for, so a node holds one Δ at a time; vectorized,
    the node holds the Δs of all its clients until they are summed (groups run in step-count order)."""
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    capped = group_size_within_memory(sum(p.numel() for p in net.parameters()), group_size)
    if capped < group_size and group_size >= 2 and model_key not in _capped:
        _capped.add(model_key)
        log.warning("client.vectorize = %s would not fit %.1f GiB for this model; training groups of %s",
                    group_size, GROUP_MEMORY_BYTES / 2**30, capped)
    group_size = capped
    if group_size < 2 or len(clients) < 2 or cfg.head == "shared":
        return _sequential(net, pop, clients, cfg, seeds, anchors, initial)
    usable = _usable(net, model_key, formulations)
    if not usable:
        return _sequential(net, pop, clients, cfg, seeds, anchors, initial)
    prepared = [_prepare(net, pop, users, cfg, seed, anchors) for users, seed in zip(clients, seeds)]
    order = sorted(range(len(clients)), key=lambda i: len(prepared[i]["schedule"]))
    results: list[LocalResult | None] = [None] * len(clients)
    for start in range(0, len(order), group_size):
        group = order[start:start + group_size]
        while usable:
            try:
                group_results = _train_group(net, pop, [prepared[i] for i in group], cfg, initial, usable[0], model_key)
                break
            except (RuntimeError, NotImplementedError) as exc:
                net.load_state_dict(initial)
                _refuse(usable.pop(0), model_key, (str(exc).splitlines() or [type(exc).__name__])[0])
        else:
            return _sequential(net, pop, clients, cfg, seeds, anchors, initial)
        for i, result in zip(group, group_results):
            results[i] = result
    net.load_state_dict(initial)
    return iter(results)


def _usable(net, model_key: str, formulations: tuple[str, ...]) -> list[str]:
    """Those of `formulations` not refused for this model, in order (none: train one by one)."""
    if not all(p.requires_grad for p in net.parameters()):  # neither formulation leaves weights out
        _refuse("vmap", model_key, "model.train_only freezes part of the model")  # one warning: one by one
        return []
    usable = []
    for how in formulations:
        if (how, model_key) in _refused:
            continue
        if how == "stacked" and (why := unsupported(net)):
            _refuse(how, model_key, why)
            continue
        usable.append(how)
    return usable


def _refuse(how: str, model_key: str, why: str) -> None:
    """Remembered per model (not for an unnamed one: another net may come under the same empty key)."""
    if model_key and (how, model_key) in _refused:
        return
    if model_key:
        _refused[(how, model_key)] = why
    if how == "stacked":
        log.info("vectorized training cannot run this model stacked (%s); using vmap", why)
    else:
        log.warning("vectorized training is not possible for this model (%s); training virtual clients "
                    "one by one", why)


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


def _train_group(net, pop, clients: list[dict], cfg: LocalTrainingConfig, initial: dict, how: str,
                 model_key: str) -> list[LocalResult]:
    trainable = [c for c in clients if len(c["schedule"])]
    results = {}
    if trainable:
        results = _train_trainable(net, pop, trainable, cfg, initial, how, model_key)
    zero = {k: torch.zeros_like(v, device="cpu") for k, v in update_state(net).items()}
    return [results.get(id(c), LocalResult({k: v.clone() for k, v in zero.items()}, 0, 0.0)) for c in clients]


def _batches(clients: list[dict], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Every step's rows, targets and mask for the whole group, (steps, B, N) each: built once, so a step
    gathers its batch with one index. Padding repeats a client's first row, with weight 0."""
    steps = [-(-len(c["schedule"]) // batch) for c in clients]
    shape = (max(steps) * batch, len(clients))
    rows = np.empty(shape, dtype=np.int64)
    targets = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.float32)
    for i, c in enumerate(clients):
        k = len(c["schedule"])
        rows[:, i] = c["schedule"][0]
        rows[:k, i] = c["schedule"]
        targets[:k, i] = c["targets"]
        mask[:k, i] = 1.0
    split = (max(steps), batch, len(clients))
    return rows.reshape(split), targets.reshape(split), mask.reshape(split), steps


def _train_trainable(net, pop, clients, cfg, initial, how: str, model_key: str) -> dict:
    device = next(net.parameters()).device
    n = len(clients)
    rows, targets, mask, steps = _batches(clients, cfg.batch_size)
    targets = torch.from_numpy(targets).to(device)
    mask = torch.from_numpy(mask).to(device)
    width = max(c["head"].shape[0] for c in clients)
    head = torch.zeros(n, width, clients[0]["head"].shape[1], device=device)
    class_mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    for i, c in enumerate(clients):
        head[i, :c["head"].shape[0]] = c["head"]
        class_mask[i, :c["head"].shape[0]] = True
    names = [name for name, _ in net.named_parameters()]
    body = {name: initial[name].unsqueeze(0).repeat(n, *([1] * initial[name].dim())) for name in names}
    buffers = dict(net.named_buffers())
    body_buf = {name: torch.zeros_like(p) for name, p in body.items()}
    head_buf = torch.zeros_like(head)
    step_counts = torch.tensor(steps, device=device)
    step = (_stacked_step if how == "stacked" else _vmap_step)(net, buffers, n, cfg.head_logits, cfg.head_scale)
    loss_sums = torch.zeros(n, dtype=torch.float64, device=device)
    net.train()
    for t in range(len(rows)):
        x = pop.tensor(rows[t].reshape(-1)).to(device)
        if how == "stacked" and t == 0 and model_key not in _verified:
            _verify_stacked(net, buffers, body, x, mask[0], n)
            if model_key:
                _verified.add(model_key)
        train_body = cfg.head_warmup_steps == 0 or t >= cfg.head_warmup_steps
        train_head = cfg.head_warmup_steps == 0 or t < cfg.head_warmup_steps
        g_body, g_head, loss = step(body, head, x, targets[t], mask[t], class_mask, train_body, train_head)
        active = None if t < min(steps) else t < step_counts
        loss_sums += loss.detach().double() if active is None else torch.where(active, loss.detach().double(), 0.0)
        if train_body:
            new_bufs = _sgd([body[k] for k in names], [body_buf[k] for k in names], [g_body[k] for k in names],
                            cfg.lr, cfg.momentum, active)
            body_buf = dict(zip(names, new_bufs))
        if train_head:
            [head_buf] = _sgd([head], [head_buf], [g_head], cfg.lr * cfg.head_lr_scale, cfg.momentum, active)
    shared = list(update_state(net))
    out = {}
    for i, c in enumerate(clients):
        trained = {**initial, **{name: body[name][i].detach() for name in names}}
        delta = {k: (initial[k] - trained[k]).cpu() for k in shared}
        out[id(c)] = LocalResult(delta, len(c["schedule"]), float(loss_sums[i] / steps[i]))
    return out


def _client_losses(emb: torch.Tensor, head: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   classes: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """Each client's mean cross-entropy over its real examples, (N,); emb is (B, N, E), y and mask (B, N)."""
    logits = class_logits(emb.transpose(0, 1), head, kind, scale).masked_fill(~classes.unsqueeze(1), MASKED_LOGIT)
    ce = F.cross_entropy(logits.flatten(0, 1), y.t().reshape(-1), reduction="none").view(y.shape[1], -1)
    weights = mask.t()
    return (ce * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _stacked_step(net, buffers, n: int, kind: str, scale: float) -> Step:
    """One autograd pass for the group: the clients' losses are independent, so the gradient of their
    sum with respect to the stacked weights is each client's own gradient."""
    def step(body, head, x, y, mask, classes, want_body, want_head):
        inputs = ([p.requires_grad_() for p in body.values()] if want_body else []) + ([head.requires_grad_()] if want_head else [])
        with stacked(net, n):
            emb = functional_call(net, (body, buffers), (x,))
        losses = _client_losses(emb.view(-1, n, emb.shape[-1]), head, y, mask, classes, kind, scale)
        grads = list(torch.autograd.grad(losses.sum(), inputs))
        g_head = grads.pop() if want_head else None
        return (dict(zip(body, grads)) if want_body else None), g_head, losses.detach()
    return step


def _vmap_step(net, buffers, n: int, kind: str, scale: float) -> Step:
    def loss_fn(params, head_w, x, y, mask, classes):
        emb = functional_call(net, (params, buffers), (x,))
        return _client_losses(emb.unsqueeze(1), head_w.unsqueeze(0), y.unsqueeze(1), mask.unsqueeze(1),
                              classes.unsqueeze(0), kind, scale)[0]

    grads_fn = vmap(grad_and_value(loss_fn, argnums=(0, 1)), in_dims=(0, 0, 1, 1, 1, 0))

    def step(body, head, x, y, mask, classes, want_body, want_head):
        (g_body, g_head), losses = grads_fn(body, head, x.view(-1, n, *x.shape[1:]), y, mask, classes)
        return g_body, g_head, losses
    return step


def _verify_stacked(net, buffers, body, x, mask, n: int) -> None:
    """At the first step every client still has the net's own weights: the stacked forward must give
    client 0 what the net gives on client 0's examples alone, and draw no random numbers (which one by
    one would draw in another order)."""
    with torch.no_grad():
        before = _rng_state(x.device)
        with stacked(net, n):
            emb = functional_call(net, (body, buffers), (x,))
        if not torch.equal(before, _rng_state(x.device)):
            raise NotStackable("the model draws random numbers in its forward")
        real = mask[:, 0] > 0
        got = emb.view(-1, n, emb.shape[-1])[:, 0][real]
        expected = net(x.view(-1, n, *x.shape[1:])[:, 0][real])
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale):
        raise NotStackable("the stacked forward differs from the model's own")


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@torch.no_grad()
def _sgd(params: list[torch.Tensor], bufs: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
         momentum: float, active: torch.Tensor | None) -> list[torch.Tensor]:
    """torch.optim.SGD's step (momentum, no dampening): the params in place, the new momentum buffers
    returned. Only for the active clients when `active` (N,) is given."""
    new_bufs = torch._foreach_add(grads, bufs, alpha=momentum)  # grad + momentum·buf: one pass over memory
    if active is None:
        torch._foreach_add_(params, new_bufs, alpha=-lr)
        return new_bufs
    gated = []
    for param, buf, new_buf in zip(params, bufs, new_bufs):
        gate = active.view(-1, *([1] * (param.dim() - 1)))
        param.copy_(torch.where(gate, param - lr * new_buf, param))
        gated.append(torch.where(gate, new_buf, buf))
    return gated
