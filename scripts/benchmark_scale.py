"""Simulation speed and memory, side by side in one command; writes docs/performance.md.

    .venv/bin/python scripts/benchmark_scale.py [--workloads A B] [--rounds 5] [--memory-users 1000 100000]

Workload A: a LeNet-size CNN (fedemb_lenet_small: 104k parameters with its 128-d embedding), 28x28
grayscale; B: timm resnet18 with GroupNorm. Both: 100 virtual clients per round of one user each,
50 examples per user, batch 10, one local epoch, a fresh local head per client (SGD with momentum,
head lr x10), averaging of the updates, `--rounds` rounds, synthetic images (random pixels and labels:
the timing does not depend on what the images show).

Arms, each a separate process whose whole process tree is measured:
  (a) a plain sequential PyTorch loop doing the same local training and averaging (all cores as
      torch threads);
  (b) Flower's per-client simulation: one SuperNode per virtual client, FedAvg, 1 CPU per ClientApp;
  (c) fedemb worker mode (no DP, fixed-size cohorts, as the others);
  (d) fedemb worker mode with vectorized local training (client.vectorize).
Figures: steady per-round time (median of rounds 2..R), start-up (end of round 1 minus one steady
round: process start, imports, Ray, actors), end to end, and the peak memory of the whole process
tree (Ray's included) as the sum of PSS (shared pages counted once) and, for reference, of RSS, each
with its ratio to (a). An arm that runs past --arm-timeout is killed and reported so. Then (c)'s peak
memory with populations of 1,000 and 100,000 users.

Sampling a round against population size (in this process, a few seconds; `--sampling-only` runs just
this and replaces its section of docs/performance.md): the time to sample and group one round
(Poisson, k = 8, q = 1000 / N, so that about 1,000 users are sampled) and the memory it allocates, for
N = 10^3 ... 10^7, side by side for the library's sampler (a Binomial count, then a uniform subset of
the population's positions: O(cohort)) and the method it replaced, kept here only as the baseline (a
keyed uniform for every user, compared with q: O(N)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fedemb.os_processes import kill, started_at, tree, tree_memory
from fedemb.report.doc_sections import write_section

ROOT = Path(__file__).resolve().parents[1]

CLIENTS, EXAMPLES, BATCH, LR, MOMENTUM, HEAD_SCALE = 100, 50, 10, 0.01, 0.9, 10.0
MODELS = {"A": "fedemb_lenet_small", "B": "resnet18"}
ARMS = {"a": "plain PyTorch loop", "b": "Flower per-client (FedAvg)", "c": "fedemb workers",
        "d": "fedemb workers, vectorized"}


# ----------------------------------------------------------------------------- data
def make_population(directory: Path, users: int) -> Path:
    """users x EXAMPLES random 28x28 images as memory-mappable .npy files (written in chunks)."""
    directory = directory.with_name(f"{directory.name}-x{EXAMPLES}") if EXAMPLES != 50 else directory
    if (directory / "user.npy").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    n = users * EXAMPLES
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(directory / "x.npy", mode="w+", dtype=np.uint8, shape=(n, 28, 28))
    for start in range(0, n, 500_000):
        stop = min(n, start + 500_000)
        x[start:stop] = rng.integers(0, 256, size=(stop - start, 28, 28), dtype=np.uint8)
    x.flush()
    del x
    np.save(directory / "y.npy", rng.integers(0, 10, size=n))
    np.save(directory / "user.npy", np.repeat(np.arange(users), EXAMPLES))
    return directory


def fedemb_overrides(data: Path, users: int, workload: str, rounds: int, vectorize: int,
                     device: str = "cpu", gpu_workers: int = 0, engine: str = "auto") -> list[str]:
    engine_set = [f'simulation.engine="{engine}"'] if engine != "auto" else []
    on_gpu = engine_set + ([f'client.device="{device}"', f"simulation.gpus_per_client={1 / gpu_workers}",
               f"simulation.cpus_per_client={max(1, (os.cpu_count() or 1) // gpu_workers)}"]
              if device == "cuda" else [])
    return on_gpu + ['data.name="npy"', f'data.path="{data}"', "data.eval_users=0.05", "data.max_eval_examples=200",
            f'model.name="{MODELS[workload]}"', "model.embedding_dim=128", "privacy.enabled=false",
            'sampling.method="fixed"', f"sampling.rate={CLIENTS / (users * 0.95)}", "sampling.users_per_client=1",
            f"sampling.virtual_clients={CLIENTS}", "client.epochs=1", f"client.batch_size={BATCH}",
            f"client.max_examples={EXAMPLES}", f"client.lr={LR}", f"client.momentum={MOMENTUM}",
            f"client.head_lr_scale={HEAD_SCALE}", f"client.vectorize={vectorize}", f"run.rounds={rounds}",
            "run.eval_every=0", "run.checkpoint_every=0", "run.seed=0", "server.lr=1.0", "server.momentum=0.0"]


# ----------------------------------------------------------------------------- the arms (child processes)
MARKS: dict[str, float] = {}  # a child's timeline: seconds since its process started


def since_start() -> float:
    return time.time() - started_at()


def train_one_user(net, x: np.ndarray, y: np.ndarray, rows: np.ndarray, device: str = "cpu") -> None:
    """The local training every arm does: one epoch over the user's rows with a fresh local head."""
    import torch

    classes, targets = np.unique(np.asarray(y[rows]), return_inverse=True)
    targets = torch.from_numpy(targets).to(device)
    head = torch.nn.Linear(128, len(classes), bias=False).to(device)
    body_opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    head_opt = torch.optim.SGD(head.parameters(), lr=LR * HEAD_SCALE, momentum=MOMENTUM)
    for b in range(0, EXAMPLES, BATCH):
        xb = torch.from_numpy(np.asarray(x[rows[b:b + BATCH]], dtype=np.float32)[:, None] / 127.5 - 1).to(device)
        loss = torch.nn.functional.cross_entropy(head(net(xb)), targets[b:b + BATCH])
        body_opt.zero_grad()
        head_opt.zero_grad()
        loss.backward()
        body_opt.step()
        head_opt.step()


def arm_plain(data: Path, users: int, workload: str, rounds: int, device: str = "cpu") -> list[float]:
    import torch

    from fedemb.config import load_config
    from fedemb.models.embedding_net import build_embedding_net

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, fedemb_overrides(data, users, workload, rounds, 0))
    x = np.load(data / "x.npy", mmap_mode="r")
    y = np.load(data / "y.npy")
    net = build_embedding_net(cfg.model, (1, 28, 28), dp_enabled=False).to(device)
    rng = np.random.default_rng(0)
    ends = []
    MARKS["first_round_started"] = since_start()
    for _ in range(rounds):
        start = {k: v.clone() for k, v in net.state_dict().items()}
        total = {k: torch.zeros_like(v) for k, v in start.items() if v.is_floating_point()}
        for u in rng.choice(users, CLIENTS, replace=False):
            net.load_state_dict(start)
            train_one_user(net, x, y, np.arange(u * EXAMPLES, (u + 1) * EXAMPLES)[rng.permutation(EXAMPLES)], device)
            for k, v in net.state_dict().items():
                if k in total:
                    total[k] += start[k] - v
        net.load_state_dict({k: start[k] - total[k] / CLIENTS if k in total else start[k] for k in start})
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(since_start())
    return ends


def arm_flower(data: Path, users: int, workload: str, rounds: int) -> list[float]:
    """Flower's own way: one SuperNode per virtual client, each ClientApp loading its partition."""
    from fedemb.flower_env import offline_flower_environment

    offline_flower_environment()
    import logging

    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedemb.config import load_config
    from fedemb.models.embedding_net import build_embedding_net

    cfg = load_config(None, fedemb_overrides(data, users, workload, rounds, 0))
    ends: list[float] = []
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        u = int(context.node_config["partition-id"])
        x = np.load(data / "x.npy", mmap_mode="r")
        y = np.load(data / "y.npy", mmap_mode="r")
        net = build_embedding_net(cfg.model, (1, 28, 28), dp_enabled=False)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        train_one_user(net, x, y, np.arange(u * EXAMPLES, (u + 1) * EXAMPLES)[np.random.default_rng(u).permutation(EXAMPLES)])
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": EXAMPLES})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            MARKS.setdefault("first_round_started", since_start())
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            out = super().aggregate_train(server_round, replies)
            ends.append(since_start())
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        net = build_embedding_net(cfg.model, (1, 28, 28), dp_enabled=False)
        TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
                    min_available_nodes=CLIENTS).start(grid, ArrayRecord(net.state_dict()), num_rounds=rounds)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"address": "local", "num_cpus": os.cpu_count() or 1,
                                                 "include_dashboard": False, "logging_level": logging.ERROR,
                                                 "log_to_driver": False}})
    return ends


def arm_fedemb(data: Path, users: int, workload: str, rounds: int, vectorize: int, device: str = "cpu",
               gpu_workers: int = 0, engine: str = "auto") -> list[float]:
    from fedemb.config import load_config

    return arm_fedemb_with(load_config(None, fedemb_overrides(data, users, workload, rounds, vectorize, device,
                                                              gpu_workers, engine)))


def arm_fedemb_with(cfg) -> list[float]:
    import tempfile

    from fedemb.run_setup import prepare_run
    from simulations.engine import run_simulation

    setup = prepare_run(cfg)
    from fedemb.monitoring.telemetry import read_telemetry

    with tempfile.TemporaryDirectory() as run_dir:
        run_simulation(setup, Path(run_dir), show_progress=False)
        rounds = read_telemetry(Path(run_dir))  # the round timeline is server-private telemetry
    created = started_at()
    first = rounds[0]
    MARKS["first_round_started"] = first["finished-at"] - first["round-seconds"] - created
    return [r["finished-at"] - created for r in rounds]


def procedural_overrides(users: int, rounds: int, engine: str) -> list[str]:
    """The quickstart (LeNet on digits writers) on a procedural population of `users`, a fixed cohort of
    CLIENTS virtual clients of one user, one local epoch, no DP (the noise costs the same at any N)."""
    return ['data.name="procedural"', f"data.procedural.users={users}", "data.num_users=100",
            f'simulation.engine="{engine}"', 'sampling.method="fixed"', f"sampling.rate={CLIENTS / users}",
            "sampling.users_per_client=1", f"sampling.virtual_clients={CLIENTS}", "client.epochs=1",
            "privacy.enabled=false", f"run.rounds={rounds}", "run.eval_every=0", "run.checkpoint_every=0",
            "run.seed=0"]


def arm_procedural(users: int, rounds: int, engine: str) -> list[float]:
    return arm_fedemb_with(load_quickstart(procedural_overrides(users, rounds, engine)))


def load_quickstart(overrides: list[str]):
    from fedemb.config import load_config

    return load_config(ROOT / "simulations" / "configs" / "quickstart.toml", overrides)


# ----------------------------------------------------------------------------- sampling a round
SAMPLING_COHORT, SAMPLING_K = 1000, 8
SAMPLING_HEADING = "## Sampling a round against population size"


def sample_and_group_every_user(sampler, round_number: int, user_ids: np.ndarray):
    """The baseline, the sampler before issue 22: a keyed uniform for every one of the N users."""
    from fedemb.privacy.keyed_random import keyed_uniform
    from fedemb.privacy.streams import STREAM_SAMPLING

    draws = keyed_uniform(sampler.seed, round_number, user_ids, STREAM_SAMPLING)
    return sampler.group(round_number, np.sort(user_ids[draws < sampler.rate]))


def measure_sampling(populations: list[int], repeats: int = 7) -> list[dict]:
    """Median wall time of sample + group over `repeats` rounds, and the peak memory one round allocates
    (tracemalloc, which numpy reports to), for the baseline and the library's sampler."""
    import tracemalloc

    from fedemb.privacy.sampling import UserSampler, virtual_client_slots

    rows = []
    for n in populations:
        users = np.arange(n, dtype=np.int64)
        q = min(1.0, SAMPLING_COHORT / n)
        sampler = UserSampler(b"benchmark secret", q, SAMPLING_K, virtual_client_slots(n, q, SAMPLING_K))
        row = {"users": n, "rate": q}
        for name, plan in (("old", lambda r: sample_and_group_every_user(sampler, r, users)),
                           ("new", lambda r: sampler.group(r, sampler.sample(r, users)))):
            plan(1)  # warm: imports, caches
            times = []
            for r in range(2, 2 + repeats):
                start = time.perf_counter()
                vcs = plan(r)
                times.append(time.perf_counter() - start)
            tracemalloc.start()
            plan(2 + repeats)
            row[f"{name}_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            row[f"{name}_ms"] = 1000 * statistics.median(times)
            row["cohort"] = sum(len(vc.user_ids) for vc in vcs)
        rows.append(row)
        print(f"sampling, {n:,} users: {row['old_ms']:.2f} ms -> {row['new_ms']:.2f} ms "
              f"({row['old_ms'] / row['new_ms']:.0f}x)", flush=True)
    return rows


def sampling_section(rows: list[dict], command: str) -> str:
    lines = [SAMPLING_HEADING, "",
             f"`{command}` on {time.strftime('%Y-%m-%d')}, in one process on {os.cpu_count()} CPUs (load average "
             f"{os.getloadavg()[0]:.1f} when written): sample and group "
             f"one round (Poisson, k = {SAMPLING_K}, q = {SAMPLING_COHORT} / N), median of the rounds measured; "
             "peak memory the round allocates (tracemalloc). Old: a keyed uniform for every user (the sampler "
             "before issue 22, kept in the benchmark only). New: the library's sampler, a Binomial(N, q) count "
             "and a uniform subset of the population's positions.", "",
             "| users N | q | users sampled (last round) | old: sample + group (ms) | new (ms) | old / new | old: peak alloc (MB) "
             "| new: peak alloc (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['users']:,} | {r['rate']:g} | {r['cohort']:,} | {r['old_ms']:.2f} | {r['new_ms']:.2f} "
                     f"| {r['old_ms'] / r['new_ms']:.1f} | {r['old_peak_mb']:.2f} | {r['new_peak_mb']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- measuring
def gpu_memory_used_mb() -> float:
    """Memory in use on the first GPU, all processes together (nvidia-smi); 0 where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0.0


def use_cohort(clients: int, examples: int) -> None:
    """Virtual clients per round and examples per user, for this process and the arms it starts."""
    global CLIENTS, EXAMPLES
    CLIENTS, EXAMPLES = clients, examples


def run_arm(arm: str, workload: str, data: Path, users: int, rounds: int, vectorize: int,
            timeout_s: float | None = None, device: str = "cpu", gpu_workers: int = 0, extra: tuple = (),
            memory_every_s: float | None = 0.2) -> dict:
    """One arm in a fresh process. Peak memory is sampled every `memory_every_s` over the whole process
    tree as the sum of RSS (counts shared pages once per process) and of PSS (shares them out, so the
    sum is what the tree really holds); None: not sampled, for comparisons of time only (reading every
    process's smaps takes a large share of a core, more for arms with more processes). An arm past
    `timeout_s` is killed and reported as such."""
    cmd = [sys.executable, __file__, "--child", arm, "--workloads", workload, "--rounds", str(rounds),
           "--child-data", str(data), "--child-users", str(users), "--vectorize", str(vectorize),
           "--device", device, "--gpu-workers", str(gpu_workers), "--clients", str(CLIENTS),
           "--examples", str(EXAMPLES), *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0, "pss": 0, "gpu": 0.0}
    gpu_before = gpu_memory_used_mb() if device == "cuda" else 0.0

    def watch():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            if device == "cuda":
                peak["gpu"] = max(peak["gpu"], gpu_memory_used_mb() - gpu_before)
            time.sleep(memory_every_s)

    watcher = threading.Thread(target=watch if memory_every_s else lambda: None, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill(tree(proc.pid))
        proc.communicate()
        watcher.join()
        return {"timed_out": True, "end_to_end_s": time.monotonic() - started, "peak_rss_mb": peak["rss"] / 2**20,
                "peak_pss_mb": peak["pss"] / 2**20}
    wall = time.monotonic() - started
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} ({workload}) failed:\n{err[-3000:]}")
    timeline = json.loads(out.strip().splitlines()[-1])
    ends = timeline["ends"]
    rounds_s = [b - a for a, b in zip(ends, ends[1:])]
    steady = statistics.median(rounds_s) if rounds_s else ends[0]
    return {"steady_round_s": steady, "startup_s": ends[0] - steady, "end_to_end_s": wall,
            "peak_rss_mb": peak["rss"] / 2**20, "peak_pss_mb": peak["pss"] / 2**20, "peak_gpu_mb": peak["gpu"], "round_ends_s": ends, "imports_s": timeline["imported"],
            "setup_s": timeline["first_round_started"] - timeline["imported"],
            "first_round_extra_s": ends[0] - timeline["first_round_started"] - steady,
            "after_last_round_s": wall - ends[-1]}


def child(args) -> None:
    import torch  # noqa: F401  (every arm needs it: counted as imports)

    from fedemb.models.embedding_net import build_embedding_net  # noqa: F401

    MARKS["imported"] = since_start()
    use_cohort(args.clients, args.examples)
    data, users, workload = Path(args.child_data), args.child_users, args.workloads[0]
    if args.child == "p":
        ends = arm_procedural(users, args.rounds, args.engine)
    elif args.child == "a":
        ends = arm_plain(data, users, workload, args.rounds, args.device)
    elif args.child == "b":
        ends = arm_flower(data, users, workload, args.rounds)
    else:
        ends = arm_fedemb(data, users, workload, args.rounds, args.vectorize if args.child == "d" else 0,
                          args.device, args.gpu_workers, args.engine)
    print(json.dumps({"ends": ends, **MARKS}))


def report(args, results: dict, memory: dict, seconds: float) -> str:
    lines = ["# Simulation performance", "",
             f"Written by `scripts/benchmark_scale.py` on {time.strftime('%Y-%m-%d')}: `{args.command}` "
             f"({seconds:.0f} s). Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Python {platform.python_version()}, no GPU used.", "",
             "Per workload: 100 virtual clients per round (one user of 50 examples each), batch 10, one local "
             f"epoch, {args.rounds} rounds; fedemb arms without DP (the others have none), fixed-size cohorts. "
             "Ratios are to the plain loop (a); for time, lower is faster.", ""]
    for workload, arms in results.items():
        base = arms["a"]
        lines += [f"## Workload {workload}: {MODELS[workload]}", "",
                  "| arm | steady round (s) | × (a) | start-up (s) | × (a) | end to end (s) | × (a) | peak PSS, all processes (MB) | × (a) | peak RSS sum (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, r in arms.items():
            if r.get("timed_out"):
                lines.append(f"| ({arm}) {ARMS[arm]} | — | — | — | — | killed after {r['end_to_end_s']:.0f} "
                             f"| > {r['end_to_end_s'] / base['end_to_end_s']:.1f} | {r['peak_pss_mb']:.0f} "
                             f"| {r['peak_pss_mb'] / base['peak_pss_mb']:.2f} | {r['peak_rss_mb']:.0f} |")
                continue
            lines.append(f"| ({arm}) {ARMS[arm]} | {r['steady_round_s']:.2f} | {r['steady_round_s'] / base['steady_round_s']:.2f} "
                         f"| {r['startup_s']:.1f} | {r['startup_s'] / max(base['startup_s'], 1e-9):.2f} "
                         f"| {r['end_to_end_s']:.1f} | {r['end_to_end_s'] / base['end_to_end_s']:.2f} "
                         f"| {r['peak_pss_mb']:.0f} | {r['peak_pss_mb'] / base['peak_pss_mb']:.2f} | {r['peak_rss_mb']:.0f} |")
        lines += ["", "Where the start-up goes (seconds): imports (torch, timm, Flower), set-up until round 1 starts "
                  "(data, model, Ray, SuperNodes), what round 1 costs beyond a steady round (Ray actors starting, "
                  "each importing torch and loading the model), and what follows the last round (evaluation, "
                  "results, shutting Ray down).", "",
                  "| arm | imports | set-up | round 1 extra | after the last round |", "|---|---|---|---|---|"]
        for arm, r in arms.items():
            if r.get("timed_out"):
                continue
            lines.append(f"| ({arm}) | {r['imports_s']:.1f} | {r['setup_s']:.1f} | {r['first_round_extra_s']:.1f} "
                         f"| {r['after_last_round_s']:.1f} |")
        lines.append("")
    if memory:
        lines += ["## Memory against population size: (c) fedemb workers, workload A", "",
                  "| users | examples | steady round (s) | peak PSS, all processes (MB) | peak RSS sum (MB) |",
                  "|---|---|---|---|---|"]
        for users, r in memory.items():
            lines.append(f"| {users:,} | {users * EXAMPLES:,} | {r['steady_round_s']:.2f} | {r['peak_pss_mb']:.0f} "
                         f"| {r['peak_rss_mb']:.0f} |")
        sizes = sorted(memory)
        change = memory[sizes[-1]]["peak_pss_mb"] / memory[sizes[0]]["peak_pss_mb"] - 1
        lines += ["", f"Peak memory changes by {change:+.1%} from {sizes[0]:,} to {sizes[-1]:,} users.", ""]
    return "\n".join(lines) + "\n"


GPU_HEADING = "## On a CUDA device"


def gpu_section(args, results: dict, seconds: float) -> str:
    import torch

    name = torch.cuda.get_device_name(0)
    lines = [GPU_HEADING, "",
             f"`{args.command}` on {time.strftime('%Y-%m-%d')} ({seconds:.0f} s): {name}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, Python {platform.python_version()}. The workloads of the tables above, "
             "every arm training on the GPU: (a) the plain loop, one client after another; (c) fedemb workers, "
             f"{args.gpu_workers} Ray workers sharing the GPU (simulation.gpus_per_client = 1/{args.gpu_workers}, "
             "client.device = \"cuda\"); (d) the same with client.vectorize = "
             f"{args.vectorize}. Ratios are to (a) on the GPU; GPU memory is the most nvidia-smi showed in use "
             "during the arm, all processes together.", ""]
    for workload, arms in results.items():
        base = arms["a"]
        lines += [f"### Workload {workload}: {MODELS[workload]}", "",
                  "| arm | steady round (s) | × (a) | start-up (s) | end to end (s) | × (a) | peak GPU memory (MB) "
                  "| peak PSS, all processes (MB) |", "|---|---|---|---|---|---|---|---|"]
        for arm, r in arms.items():
            if r.get("timed_out"):
                lines.append(f"| ({arm}) {ARMS[arm]} | — | — | — | killed after {r['end_to_end_s']:.0f} | — "
                             f"| {r['peak_gpu_mb']:.0f} | {r['peak_pss_mb']:.0f} |")
                continue
            lines.append(f"| ({arm}) {ARMS[arm]} | {r['steady_round_s']:.3f} | {r['steady_round_s'] / base['steady_round_s']:.2f} "
                         f"| {r['startup_s']:.1f} | {r['end_to_end_s']:.1f} | {r['end_to_end_s'] / base['end_to_end_s']:.2f} "
                         f"| {r['peak_gpu_mb']:.0f} | {r['peak_pss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["A", "B"], choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--vectorize", type=int, default=50)
    parser.add_argument("--memory-users", type=int, nargs="*", default=[1000, 100_000])
    parser.add_argument("--sampling-users", type=int, nargs="*", default=[10**3, 10**4, 10**5, 10**6, 10**7],
                        help="Populations at which to time sampling a round of about 1,000 users.")
    parser.add_argument("--sampling-only", action="store_true",
                        help="Only time sampling a round, and replace that section of --out.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedemb-benchmark"))
    parser.add_argument("--arm-timeout", type=float, default=1800.0,
                        help="Kill an arm after this many seconds and report it as killed.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: arms (a), (c) and (d) train on the GPU; only the section of --out about the "
                             "GPU is replaced.")
    parser.add_argument("--gpu-workers", type=int, default=4,
                        help="With --device cuda: Ray workers sharing the GPU in arms (c) and (d).")
    parser.add_argument("--cohorts", type=int, nargs="*", default=[],
                        help="Only the cohort sweep: (a) and --cohort-arms at these virtual clients per round (workload A, "
                             "--cohort-examples examples per user); replaces that section of --out.")
    parser.add_argument("--versus-flower", type=int, default=0, metavar="COHORT",
                        help="Only (a), (b) and (c) end to end at this cohort (workload A, --cohort-examples "
                             "examples per user); replaces that section of --out.")
    parser.add_argument("--cohort-examples", type=int, default=20)
    parser.add_argument("--cohort-arms", nargs="+", default=["c:auto"],
                        choices=[f"{arm}:{engine}" for arm in "cd" for engine in ("auto", "inprocess", "ray")],
                        help="With --cohorts or --versus-flower: the fedemb arms, as ARM:ENGINE; d trains --vectorize "
                             "virtual clients at once.")
    parser.add_argument("--populations", type=int, nargs="*", default=[],
                        help="Only the population sweep: fedemb on a procedural population (digits base) of each "
                             "of these sizes at a fixed cohort of --population-cohort, on each of "
                             "--population-engines; replaces that section of --out.")
    parser.add_argument("--population-cohort", type=int, default=100)
    parser.add_argument("--population-engines", nargs="+", default=["inprocess", "ray"], choices=["inprocess", "ray"])
    parser.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=EXAMPLES, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    parser.add_argument("--child-users", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.command = "python scripts/benchmark_scale.py " + " ".join(sys.argv[1:])
    if args.sampling_only:
        section = sampling_section(measure_sampling(args.sampling_users), args.command)
        write_section(args.out, SAMPLING_HEADING, section)
        print(section)
        print(f"written to {args.out}")
        return
    if args.device == "cuda":
        run_on_gpu(args)
        return
    if args.cohorts or args.versus_flower:
        run_cohorts(args)
        return
    if args.populations:
        run_populations(args)
        return
    os.environ.setdefault("FEDEMB_CACHE_DIR", str(args.work / "store"))
    from fedemb.config import load_config
    from fedemb.data.store import materialize

    started = time.monotonic()
    populations = sorted({args.users, *args.memory_users})
    data = {}
    for users in populations:
        data[users] = make_population(args.work / f"users-{users}", users)
        for workload in args.workloads:  # build the memory-mapped store once, outside the measurements
            materialize(load_config(None, fedemb_overrides(data[users], users, workload, 1, 0)).data)
    results: dict = {}
    for workload in args.workloads:
        results[workload] = {}
        for arm in args.arms:
            r = run_arm(arm, workload, data[args.users], args.users, args.rounds, args.vectorize, args.arm_timeout)
            results[workload][arm] = r
            if r.get("timed_out"):
                print(f"{workload} ({arm}) {ARMS[arm]}: killed after {r['end_to_end_s']:.0f} s", flush=True)
                continue
            print(f"{workload} ({arm}) {ARMS[arm]}: steady {r['steady_round_s']:.2f} s, start-up {r['startup_s']:.1f} s, "
                  f"end to end {r['end_to_end_s']:.1f} s, peak PSS {r['peak_pss_mb']:.0f} MB", flush=True)
    memory = {}
    for users in args.memory_users:
        memory[users] = run_arm("c", "A", data[users], users, args.rounds, 0)
        print(f"memory, {users} users: peak PSS {memory[users]['peak_pss_mb']:.0f} MB", flush=True)
    sampling = measure_sampling(args.sampling_users) if args.sampling_users else []
    text = report(args, results, memory, time.monotonic() - started)
    if sampling:
        text += "\n" + sampling_section(sampling, args.command)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")


COHORT_HEADING = "## Round time against cohort size"
FLOWER_HEADING = "## End to end against Flower's per-client simulation"


def run_cohorts(args) -> None:
    """The cohort sweep, or the comparison with Flower at one cohort: each arm a fresh process."""
    os.environ.setdefault("FEDEMB_CACHE_DIR", str(args.work / "store"))
    from fedemb.config import load_config
    from fedemb.data.store import materialize

    started = time.monotonic()
    sweep_arms = [("a", "auto", 0)] + [(arm, engine, args.vectorize if arm == "d" else 0)
                                       for arm, engine in (spec.split(":") for spec in args.cohort_arms)]
    plans = ([(c, sweep_arms) for c in args.cohorts] if args.cohorts
             else [(args.versus_flower, [("a", "auto", 0), ("b", "auto", 0)] + sweep_arms[1:])])
    results = {}
    for clients, arms in plans:
        use_cohort(clients, args.cohort_examples)
        users = max(args.users, int(clients / 0.9))
        data = make_population(args.work / f"users-{users}", users)
        materialize(load_config(None, fedemb_overrides(data, users, "A", 1, 0)).data)
        results[clients] = {}
        for arm, engine, vectorize in arms:
            label = arm if arm in "ab" else f"{arm} {engine}"
            r = run_arm(arm, "A", data, users, args.rounds, vectorize, args.arm_timeout, extra=("--engine", engine),
                        memory_every_s=None)
            results[clients][label] = r
            print(f"cohort {clients:,} ({label}) {ARMS[arm]}: " + (f"killed after {r['end_to_end_s']:.0f} s" if r.get("timed_out")
                  else f"steady {r['steady_round_s']:.2f} s, start-up {r['startup_s']:.1f} s, end to end {r['end_to_end_s']:.1f} s"),
                  flush=True)
    seconds = time.monotonic() - started
    heading, section = ((COHORT_HEADING, cohort_section(args, results, seconds)) if args.cohorts
                        else (FLOWER_HEADING, flower_section(args, results[args.versus_flower], seconds)))
    write_section(args.out, heading, section)
    print(section)
    print(f"written to {args.out}")


def machine_line(args, seconds: float) -> str:
    return (f"`{args.command}` on {time.strftime('%Y-%m-%d')} ({seconds:.0f} s): {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f} when written, Python {platform.python_version()}")


def engine_name(engine: str) -> str:
    from fedemb.config import load_config
    from fedemb.flower_env import resolved_engine

    return f"{resolved_engine(load_config(None, []))} engine (auto, the default here)" if engine == "auto" else f"{engine} engine"


def cohort_arm_name(label: str, vectorize: int) -> str:
    if label == "a":
        return "(a) plain PyTorch loop"
    arm, engine = label.split()
    suffix = f", vectorized ({vectorize} at once)" if arm == "d" else ""
    return f"({arm}) fedemb, {engine_name(engine)}{suffix}"


def cohort_section(args, results: dict, seconds: float) -> str:
    cohorts = sorted(results)
    first = results[cohorts[0]]
    lines = [COHORT_HEADING, "",
             f"{machine_line(args, seconds)}. Workload A (fedemb_lenet_small), one user of {args.cohort_examples} "
             f"examples per virtual client, batch {BATCH}, one local epoch, {args.rounds} rounds, steady round = "
             f"median of rounds 2..{args.rounds}. (a) the plain PyTorch loop (all CPUs' threads, one process); "
             "(c) fedemb on each engine, no DP, fixed-size cohorts; (d) the same, training several virtual "
             "clients at once. Growth is against the same arm at the smallest cohort; per virtual client is "
             "the steady round divided by the cohort.", "",
             "| virtual clients per round | arm | steady round (s) | ÷ (a) | growth | ms per virtual client |",
             "|---|---|---|---|---|---|"]
    for c in cohorts:
        base = results[c]["a"]
        for label, r in results[c].items():
            name = cohort_arm_name(label, args.vectorize)
            if r.get("timed_out"):
                lines.append(f"| {c:,} | {name} | killed after {r['end_to_end_s']:.0f} s | | | |")
                continue
            ratio = "" if base.get("timed_out") else f"{r['steady_round_s'] / base['steady_round_s']:.2f}"
            growth = ("" if label not in first or first[label].get("timed_out")
                      else f"{r['steady_round_s'] / first[label]['steady_round_s']:.1f}×")
            lines.append(f"| {c:,} | {name} | {r['steady_round_s']:.2f} | {ratio} | {growth} "
                         f"| {1000 * r['steady_round_s'] / c:.1f} |")
    lines += ["", "Round time from one cohort to the next (linear growth is the cohort's own factor):", ""]
    for small, large in zip(cohorts, cohorts[1:]):
        steps = []
        for label, r in results[large].items():
            before = results[small].get(label)
            if before and not (r.get("timed_out") or before.get("timed_out")):
                arm, *engine = label.split()  # "a", or "c ray": the table's "(c) ray"
                steps.append(f"({arm}){''.join(' ' + e for e in engine)} "
                             f"{r['steady_round_s'] / before['steady_round_s']:.1f}×")
        lines.append(f"- {small:,} → {large:,} ({large / small:g}×): " + ", ".join(steps))
    return "\n".join(lines) + "\n"


def flower_section(args, arms: dict, seconds: float) -> str:
    a, b = arms["a"], arms["b"]
    clients = args.versus_flower
    lines = [FLOWER_HEADING, "",
             f"{machine_line(args, seconds)}. Workload A, {clients:,} virtual clients per round (one user of "
             f"{args.cohort_examples} examples each), {args.rounds} rounds. (b) Flower's per-client simulation "
             f"({clients:,} SuperNodes, FedAvg, 1 CPU per ClientApp); (c) fedemb on each engine named (the "
             "default, auto, picks inprocess for a run this short on this machine); (d) the same, training "
             "several virtual clients at once; (a) the plain loop, the floor all are measured against.", "",
             "| arm | end to end (s) | (b) ÷ this | steady round (s) | start-up (s) | ms per virtual client, steady "
             "| beyond (a) per virtual client (ms) |", "|---|---|---|---|---|---|---|"]
    for label, r in arms.items():
        name = f"({label}) {ARMS[label]}" if label in "ab" else cohort_arm_name(label, args.vectorize)
        if r.get("timed_out"):
            lines.append(f"| {name} | killed after {r['end_to_end_s']:.0f} | | | | | |")
            continue
        lines.append(f"| {name} | {r['end_to_end_s']:.1f} | {b['end_to_end_s'] / r['end_to_end_s']:.2f} "
                     f"| {r['steady_round_s']:.2f} | {r['startup_s']:.1f} | {1000 * r['steady_round_s'] / clients:.1f} "
                     f"| {1000 * (r['steady_round_s'] - a['steady_round_s']) / clients:.1f} |")
    fedemb = {label: r for label, r in arms.items() if label not in "ab" and not r.get("timed_out")}
    if fedemb and not b.get("timed_out"):
        ratios = ", ".join(f"{b['end_to_end_s'] / r['end_to_end_s']:.1f}× ({label})" for label, r in fedemb.items())
        ceiling = b["end_to_end_s"] / a["end_to_end_s"]
        lines += ["", f"fedemb against Flower's per-client simulation, end to end: {ratios}. The plain loop, which "
                  f"has no framework at all, is {ceiling:.1f}× faster than (b): the training itself "
                  f"({1000 * a['steady_round_s'] / clients:.1f} ms per virtual client on these CPUs) is the floor of "
                  "any arm, and (b)'s overhead beyond it is what a faster framework can remove."]
    return "\n".join(lines) + "\n"


POPULATION_HEADING = "## Round time and memory against population size"


def run_populations(args) -> None:
    """fedemb at each population size, a fresh process each, the sizes interleaved per engine."""
    use_cohort(args.population_cohort, EXAMPLES)
    started = time.monotonic()
    results: dict = {}
    for engine in args.population_engines:
        results[engine] = {}
        for users in args.populations:
            cmd = ["--engine", engine]
            r = run_arm("p", "A", args.work, users, args.rounds, 0, args.arm_timeout, extra=cmd, memory_every_s=1.0)
            results[engine][users] = r
            print(f"population {users:,} ({engine}): " + (f"killed after {r['end_to_end_s']:.0f} s" if r.get("timed_out")
                  else f"steady {r['steady_round_s']:.2f} s, peak PSS {r['peak_pss_mb']:.0f} MB"), flush=True)
    section = population_section(args, results, time.monotonic() - started)
    write_section(args.out, POPULATION_HEADING, section)
    print(section)
    print(f"written to {args.out}")


def population_section(args, results: dict, seconds: float) -> str:
    lines = [POPULATION_HEADING, "",
             f"{machine_line(args, seconds)}. The quickstart's model and client settings (LeNet, digits) on a "
             "procedural population ([procedural.md](procedural.md)) of N users, a fixed cohort of "
             f"{args.population_cohort} virtual clients of one user (fixed-size sampling, q = "
             f"{args.population_cohort} / N), one local epoch, no DP, {args.rounds} rounds; steady round = median "
             f"of rounds 2..{args.rounds}; peak memory of the whole process tree (Ray's included). Each row a fresh "
             "process; changes are against the smallest N on the same engine.", "",
             "| engine | users N | steady round (s) | change | peak PSS, all processes (MB) | change | peak RSS sum (MB) |",
             "|---|---|---|---|---|---|---|"]
    for engine, rows in results.items():
        first = rows[min(rows)]
        for users, r in sorted(rows.items()):
            if r.get("timed_out"):
                lines.append(f"| {engine} | {users:,} | killed after {r['end_to_end_s']:.0f} s | | | | |")
                continue
            lines.append(f"| {engine} | {users:,} | {r['steady_round_s']:.2f} | "
                         f"{r['steady_round_s'] / first['steady_round_s'] - 1:+.1%} | {r['peak_pss_mb']:.0f} | "
                         f"{r['peak_pss_mb'] / first['peak_pss_mb'] - 1:+.1%} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def run_on_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine")
    os.environ.setdefault("FEDEMB_CACHE_DIR", str(args.work / "store"))
    from fedemb.config import load_config
    from fedemb.data.store import materialize

    started = time.monotonic()
    data = make_population(args.work / f"users-{args.users}", args.users)
    arms = [arm for arm in args.arms if arm != "b"] if "--arms" in sys.argv else ["a", "c", "d"]
    results: dict = {}
    for workload in args.workloads:
        materialize(load_config(None, fedemb_overrides(data, args.users, workload, 1, 0)).data)
        results[workload] = {}
        for arm in arms:
            r = run_arm(arm, workload, data, args.users, args.rounds, args.vectorize, args.arm_timeout, "cuda",
                        args.gpu_workers)
            results[workload][arm] = r
            print(f"GPU {workload} ({arm}) {ARMS[arm]}: " + (f"killed after {r['end_to_end_s']:.0f} s" if r.get("timed_out")
                  else f"steady {r['steady_round_s']:.3f} s, start-up {r['startup_s']:.1f} s, end to end "
                       f"{r['end_to_end_s']:.1f} s, peak GPU {r['peak_gpu_mb']:.0f} MB"), flush=True)
    section = gpu_section(args, results, time.monotonic() - started)
    write_section(args.out, GPU_HEADING, section)
    print(section)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
