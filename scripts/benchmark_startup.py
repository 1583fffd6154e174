"""Start-up of `fedemb simulate`, from launch to the first round and to the end, broken down; writes the
"Start-up" section of docs/performance.md.

    .venv/bin/python scripts/benchmark_startup.py [--repeats 3] [--rounds 3] [--baseline REV] [--sweep-runs 3]

Each arm is the quickstart (simulations/configs/quickstart.toml, seeded, --rounds rounds) run by the real
command line in a fresh process, the arms interleaved within each repeat, medians reported:
  ray             the Ray engine (worker mode), as the working tree has it
  ray-baseline    the same with the start-up code at --baseline (default HEAD: today's code path): the
                  files in BASELINE_FILES are read with `git show REV:FILE` and imported in place of the
                  working tree's, in every process of the run
  ray-cold        the Ray engine with an empty data cache: the first process builds the memory-mapped store
  inprocess       simulation.engine = "inprocess": the same strategy and ClientApp without Ray
The timeline comes from the run's own processes: a sitecustomize on PYTHONPATH (in a temporary folder)
records, with the wall clock all processes share, when each process started, how long the heavy imports
took and when the functions that mark a phase ran (config, data, model, ray.init, round 0 evaluation,
TensorBoard, each round's configure/aggregate, each worker's training). The timings stay with this
script: nothing is written into the runs. Seeded runs are compared byte for byte (checkpoints/final.pt
and privacy.json) between each arm and ray-baseline, and every process a run started must be gone after it.

--sweep-runs N also runs an N-run digits sweep (`fedemb experiments run`, the quickstart with --rounds
rounds at N seeds) once with the sweep's Ray kept warm (the default) and once with --no-warm-ray (each
run starts its own Ray, as before), interleaved, and reports the per-run wall times and whether each
run's outputs are byte-identical between the two.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations" / "configs" / "quickstart.toml"
SECTION = "## Start-up"
BASELINE_FILES = ["simulations/engine.py"]
TRACE_DIR, OVERLAY_DIR = "FEDEMB_STARTUP_TRACE", "FEDEMB_STARTUP_OVERLAY"

# ----------------------------------------------------------------------------- the tracer (every process)
# Only the standard library at the top of this file: every Python process of a traced run imports it.
IMPORTS = ("torch", "timm", "opacus", "ray", "flwr", "flwr.simulation", "fedemb.cli.app", "fedemb.run_setup",
           "simulations.client_app", "simulations.run")
CALLS = {  # module: (class or "", function) whose calls mark a phase
    "fedemb.config": [("", "load_config")],
    "fedemb.data.store": [("", "load_splits")],
    "fedemb.models.embedding_net": [("", "build_embedding_net")],
    "simulations.run": [("", "run_federated")],
    "simulations.evaluator": [("Evaluator", "__call__")],
    "fedemb.monitoring.tensorboard": [("TensorBoardLogger", "log_run_start"), ("TensorBoardLogger", "log_eval")],
    "ray": [("", "init"), ("", "shutdown")],
    "strategies.dp_fedemb": [("DPFedEmb", "configure_train"), ("DPFedEmb", "aggregate_train")],
    "fedemb.training.client_task": [("", "run_train_assignment")],
}


class _Recorder:
    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"events-{os.getpid()}.jsonl")
        self.lock = threading.Lock()

    def __call__(self, name: str, t0: float, t1: float, **extra) -> None:
        line = json.dumps({"pid": os.getpid(), "name": name, "t0": t0, "t1": t1, **extra})
        with self.lock, open(self.path, "a") as f:
            f.write(line + "\n")


def _timed(record: _Recorder, name: str, fn):
    def timed(*args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            record(name, t0, time.time())
    timed.__wrapped__ = fn
    return timed


class _TracingLoader:
    """Runs a module, records how long that took (IMPORTS), then wraps the functions CALLS names."""

    def __init__(self, loader, name: str, record: _Recorder):
        self.loader, self.name, self.record = loader, name, record

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        t0 = time.time()
        self.loader.exec_module(module)
        if self.name in IMPORTS:
            self.record("import " + self.name, t0, time.time())
        for cls, attr in CALLS.get(self.name, []):
            owner = getattr(module, cls) if cls else module
            setattr(owner, attr, _timed(self.record, f"{self.name}.{cls + '.' if cls else ''}{attr}", getattr(owner, attr)))

    def __getattr__(self, item):
        return getattr(self.loader, item)


class _TracingFinder:
    """A meta path finder in front of the others: baseline files from OVERLAY_DIR, and tracing loaders."""

    def __init__(self, record: _Recorder, overlay: str):
        self.record, self.overlay, self.busy = record, overlay, set()

    def find_spec(self, name, path, target=None):
        import importlib.util

        if name in self.busy or (name not in IMPORTS and name not in CALLS and not self._overlaid(name)):
            return None
        if self._overlaid(name):
            spec = importlib.util.spec_from_file_location(name, self._overlaid(name))
        else:
            self.busy.add(name)
            try:
                spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                             and (s := f.find_spec(name, path, target)) is not None), None)
            finally:
                self.busy.discard(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _TracingLoader(spec.loader, name, self.record)
        return spec

    def _overlaid(self, name: str) -> str:
        path = os.path.join(self.overlay, name + ".py") if self.overlay else ""
        return path if path and os.path.isfile(path) else ""


def install_tracer() -> None:
    """Called by the sitecustomize this script writes, in every Python process of a traced run."""
    record = _Recorder(os.environ[TRACE_DIR])
    import psutil

    record("process", psutil.Process().create_time(), time.time(), argv=" ".join(sys.argv)[:300])
    sys.meta_path.insert(0, _TracingFinder(record, os.environ.get(OVERLAY_DIR, "")))


SITECUSTOMIZE = f'''import os
if os.environ.get("{TRACE_DIR}"):
    import importlib.util
    _spec = importlib.util.spec_from_file_location("_fedemb_startup_tracer", {str(Path(__file__).resolve())!r})
    _tracer = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_tracer)
    _tracer.install_tracer()
'''


# ----------------------------------------------------------------------------- running the arms
ARMS = {
    "ray-baseline": {"label": "Ray engine, --baseline's code path", "sets": ["simulation.engine=ray"], "overlay": True},
    "ray": {"label": "Ray engine", "sets": ["simulation.engine=ray"], "overlay": False},
    "ray-cold": {"label": "Ray engine, empty data cache", "sets": ["simulation.engine=ray"], "overlay": False,
                 "cold": True},
    "inprocess": {"label": "in-process engine (no Ray; auto's choice on <= 2 CPUs)",
                  "sets": ["simulation.engine=inprocess"], "overlay": False},
}


def run_traced(command: list[str], work: Path, env_extra: dict[str, str]) -> dict:
    """`command` in a fresh process tree with the tracer on: its events, wall times and leftovers."""
    from fedemb.os_processes import tree, wait_gone

    trace = work / "trace"
    trace.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra)
    env[TRACE_DIR] = str(trace)
    env["PYTHONPATH"] = os.pathsep.join([str(work.parent / "site"), *filter(None, [env.get("PYTHONPATH")])])
    seen: dict[int, object] = {}
    cpu: list[tuple[float, dict[int, tuple[str, float]]]] = []  # (when, pid -> (role, CPU seconds so far))
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work)

    def watch():  # every process the run starts (to check afterwards that none is left) and its CPU time
        roles: dict[int, str] = {}
        while proc.poll() is None:
            now, reading = time.time(), dict(cpu[-1][1]) if cpu else {}
            for p in tree(proc.pid):
                seen[p.pid] = p
                try:
                    times, argv = p.cpu_times(), " ".join(p.cmdline())
                except Exception:  # noqa: BLE001 - gone meanwhile
                    continue
                roles[p.pid] = _role(p.pid, proc.pid, argv, roles.get(p.pid, ""))
                reading[p.pid] = (roles[p.pid], times.user + times.system)
            cpu.append((now, reading))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    ended = time.time()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({proc.returncode}):\n{output[-3000:]}")
    left = wait_gone(seen.values(), timeout=30.0)
    events = [json.loads(line) for f in trace.glob("events-*.jsonl") for line in f.read_text().splitlines()]
    return {"events": events, "pid": proc.pid, "popen_at": started, "ended_at": ended, "output": output, "cpu": cpu,
            "leftovers": [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left if _cmdline_ok(p)]}


ROLES = ("driver", "Flower's actors", "Ray's other workers (idle)", "Ray's own processes")


def _role(pid: int, driver: int, argv: str, before: str) -> str:
    if pid == driver:
        return ROLES[0]
    if "ClientAppActor" in argv or before == ROLES[1]:
        return ROLES[1]
    if any(w in argv for w in ("ray::IDLE", "default_worker.py", "setup_worker.py")):
        return ROLES[2]
    return ROLES[3]  # GCS, raylet, dashboard, monitors, agents (ray::DashboardAgent, ray::RuntimeEnvAgent)


def cpu_until(cpu: list, when: float) -> dict[str, float]:
    """CPU seconds each role of the run's processes had used by `when` (the last reading before it)."""
    reading = next((r for t, r in reversed(cpu) if t <= when), {})
    totals = dict.fromkeys(ROLES, 0.0)
    for role, seconds in reading.values():
        totals[role] += seconds
    return totals


def _cmdline_ok(process) -> bool:
    try:
        process.cmdline()
        return True
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False


def overlay_from(rev: str, folder: Path) -> list[str]:
    """The BASELINE_FILES as they are at `rev` (read-only `git show`), named by module, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in BASELINE_FILES:
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        (folder / (rel[:-3].replace("/", ".") + ".py")).write_text(text)
    return BASELINE_FILES


def simulate_arm(arm: str, rounds: int, work: Path, cache: Path, overlay: Path | None) -> dict:
    spec = ARMS[arm]
    run_dir = work / "run"
    command = [sys.executable, "-m", "fedemb", "simulate", "--config", str(QUICKSTART), "--run-dir", str(run_dir),
               "--set", f"run.rounds={rounds}", *[a for s in spec["sets"] for a in ("--set", s)]]
    env = {"FEDEMB_CACHE_DIR": str(work / "cache" if spec.get("cold") else cache)}
    if spec["overlay"] and overlay is not None:
        env[OVERLAY_DIR] = str(overlay)
    result = run_traced(command, work, env)
    result["phases"] = p = phases(result["events"], result["pid"], result["ended_at"])
    launch = result["ended_at"] - p["→ end to end (s)"]
    used = cpu_until(result["cpu"], launch + p["→ round 1 done (s after launch)"])
    for role in ROLES:
        p[f"CPU s until round 1 done: {role}"] = used[role]
    p["CPU s until round 1 done: all ÷ CPUs (least wall time)"] = sum(used.values()) / (os.cpu_count() or 1)
    result["run_dir"] = run_dir
    return result


# ----------------------------------------------------------------------------- the breakdown
def _first(events, name, pid=None):
    found = [e for e in events if e["name"] == name and (pid is None or e["pid"] == pid)]
    return min(found, key=lambda e: e["t0"]) if found else None


def _span(e) -> float:
    return e["t1"] - e["t0"] if e else 0.0


def _union(intervals) -> float:
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(intervals):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def phases(events: list[dict], driver: int, ended_at: float) -> dict[str, float]:
    """Seconds of each phase, and milestones as seconds after launch (the driver process's creation)."""
    mine = [e for e in events if e["pid"] == driver]
    launch = _first(mine, "process")["t0"]
    configure = sorted((e for e in mine if e["name"].endswith("configure_train")), key=lambda e: e["t0"])
    aggregate = sorted((e for e in mine if e["name"].endswith("aggregate_train")), key=lambda e: e["t0"])
    round1 = configure[0]["t0"]
    trained = [e for e in events if e["name"].endswith("run_train_assignment")]
    workers = sorted({e["pid"] for e in trained} - {driver})
    p: dict[str, float] = {}
    p["python start, CLI import"] = _first(mine, "import fedemb.cli.app")["t1"] - launch
    p["config"] = _span(_first(mine, "fedemb.config.load_config"))
    p["imports: torch, timm, Opacus"] = _span(_first(mine, "import fedemb.run_setup"))
    p["  of which timm (torchvision, torch._dynamo)"] = _span(_first(mine, "import timm"))
    p["data load (memory-mapped store)"] = _span(_first(mine, "fedemb.data.store.load_splits"))
    p["model build"] = _span(_first(mine, "fedemb.models.embedding_net.build_embedding_net"))
    p["imports: Ray, Flower, run driver"] = _union((e["t0"], e["t1"]) for e in mine if e["name"] in (
        "import ray", "import flwr.simulation", "import simulations.client_app", "import simulations.run"))
    p["Ray start (ray.init)"] = _span(_first(mine, "ray.init"))
    p["round 0: evaluation"] = sum(_span(e) for e in mine if e["name"].endswith("Evaluator.__call__") and e["t0"] < round1)
    p["round 0: TensorBoard (config, images, projector)"] = sum(
        _span(e) for e in mine if ("log_run_start" in e["name"] or "log_eval" in e["name"]) and e["t0"] < round1)
    p["→ round 1 sent (s after launch)"] = configure[0]["t1"] - launch
    if workers:
        def per_worker(name):
            return statistics.median(_span(_first(events, name, w)) for w in workers)
        p["worker process started (s after launch)"] = statistics.median(
            _first(events, "process", w)["t0"] for w in workers) - launch
        p["worker: import Ray"] = per_worker("import ray")
        p["worker: import Flower (the actor's class)"] = per_worker("import flwr.simulation")
        p["worker: ClientApp imports (torch, timm, fedemb)"] = per_worker("import simulations.client_app")
        p["worker: round 1 training"] = per_worker("fedemb.training.client_task.run_train_assignment")
    training = [_first(trained, "fedemb.training.client_task.run_train_assignment", w) for w in (workers or [driver])]
    p["→ round 1 training on every worker (s after launch)"] = max(e["t0"] for e in training) - launch
    p["→ round 1 done (s after launch)"] = aggregate[0]["t1"] - launch
    steady = [a["t1"] - c["t0"] for c, a in zip(configure[1:], aggregate[1:])]
    p["steady round"] = statistics.median(steady) if steady else float("nan")
    p["start-up: round 1 done − a steady round"] = p["→ round 1 done (s after launch)"] - p["steady round"]
    run = _first(mine, "simulations.run.run_federated")
    p["after the last round: evaluation, results, TensorBoard"] = run["t1"] - aggregate[-1]["t1"]
    p["Ray shutdown"] = sum(_span(e) for e in mine if e["name"] == "ray.shutdown")
    p["→ end to end (s)"] = ended_at - launch
    return p


def median_phases(results: list[dict]) -> dict[str, float]:
    keys = [k for k in results[0]["phases"]]
    return {k: statistics.median(r["phases"].get(k, float("nan")) for r in results) for k in keys}


def identical(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in ("checkpoints/final.pt", "privacy.json"))


# ----------------------------------------------------------------------------- the sweep
SWEEP_SPEC = '''name = "startup-sweep"
description = "start-up benchmark: the quickstart at {runs} seeds"
config = "{config}"
seeds = {seeds}
set = ["run.rounds={rounds}"]

[[group]]
label = "quickstart"
'''


def sweep_arm(warm: bool, runs: int, rounds: int, work: Path, cache: Path) -> dict:
    spec = work / "sweep.toml"
    work.mkdir(parents=True)
    spec.write_text(SWEEP_SPEC.format(runs=runs, config=QUICKSTART, seeds=list(range(runs)), rounds=rounds))
    command = [sys.executable, "-m", "fedemb", "experiments", "run", str(spec), "--runs", str(work / "runs"),
               *([] if warm else ["--no-warm-ray"])]
    result = run_traced(command, work, {"FEDEMB_CACHE_DIR": str(cache)})
    cells = sorted((work / "runs").rglob("results.json"))
    result["run_dirs"] = [c.parent for c in cells]
    result["run_seconds"] = [json.loads((c.parent / "private" / "experiment-timing.json").read_text())["wall_seconds"]
                             for c in cells]
    result["wall"] = result["ended_at"] - result["popen_at"]
    return result


# ----------------------------------------------------------------------------- the report
def section(args, arms: dict[str, list[dict]], checks: list[str], sweep: dict | None, seconds: float) -> str:
    med = {arm: median_phases(rs) for arm, rs in arms.items()}
    base = med.get("ray-baseline")
    cols = list(arms)
    lines = [SECTION, "",
             f"Written by `scripts/benchmark_startup.py` on {time.strftime('%Y-%m-%d')}: `{args.command}` ({seconds:.0f} s; "
             f"baseline: {args.baseline} = {args.baseline_hash[:10]}, files {', '.join(BASELINE_FILES)}). "
             f"{os.cpu_count()} CPUs, shared with other work: the figures are medians of {args.repeats} repeats, "
             "the arms interleaved in each repeat. The quickstart (`fedemb simulate -c simulations/configs/quickstart.toml "
             f"--set run.rounds={args.rounds}`), launched as a new process; seconds from the run's own processes "
             "(one wall clock for all of them). Phases of the driver run one after another unless they overlap "
             "(Ray starts while Flower is imported; round 0 runs while the workers start); the workers' phases "
             "run in each worker, side by side. → marks a moment, in seconds after launch.", "",
             "| phase (s) | " + " | ".join(ARMS[a]["label"] for a in cols) + (" | Ray ÷ baseline |" if base else " |"),
             "|---|" + "---|" * len(cols) + ("---|" if base else "")]
    for key in med[cols[0]]:
        cells = [med[a].get(key, float("nan")) for a in cols]
        row = f"| {key} | " + " | ".join("" if v != v else f"{v:.2f}" for v in cells)
        if base:
            b, n = base.get(key, float("nan")), med["ray"].get(key, float("nan"))
            row += " | " + (f"{n / b:.2f}" if b == b and n == n and b > 0.05 else "")
        lines.append(row + " |")
    lines += ["", *checks]
    if "ray" in med:
        lines += ["", *explanation(med)]
    if sweep:
        lines += ["", "### A sweep with Ray kept warm", "",
                  f"`fedemb experiments run` of the quickstart at {args.sweep_runs} seeds, {args.rounds} rounds each "
                  "(median of the repeats): each run in its own process, as before, but joining one local Ray that the "
                  "sweep starts once (`--warm-ray`, the default) instead of starting and stopping its own "
                  "(`--no-warm-ray`).", "",
                  "| | per run (s, median) | whole sweep (s) |", "|---|---|---|"]
        for label, key in (("each run starts its own Ray (--no-warm-ray)", "cold"), ("Ray kept warm", "warm")):
            lines.append(f"| {label} | {sweep[key]['per_run']:.1f} | {sweep[key]['wall']:.1f} |")
        lines += ["", f"Saving per run: {sweep['cold']['per_run'] - sweep['warm']['per_run']:.1f} s "
                  f"({1 - sweep['warm']['per_run'] / sweep['cold']['per_run']:.0%}). {sweep['check']}"]
    return "\n".join(lines) + "\n"


def explanation(med: dict[str, dict[str, float]]) -> list[str]:
    """What changed, and why the first round is not done within 10 s on this many CPUs: from the medians."""
    ray, cpus = med["ray"], os.cpu_count() or 1

    def cpu(role: str) -> float:
        return ray[f"CPU s until round 1 done: {role}"]

    total = sum(cpu(role) for role in ROLES)
    lines = ["What the Ray engine does differently from the baseline: fedemb calls `ray.init` itself, in a thread "
             "of its own that starts while the driver imports Flower and the run driver, and without the runtime "
             "environment Flower's own `ray.init` passes (only to set PYTHONPATH, which the workers now inherit). "
             "With a runtime environment Ray leaves the workers it starts with the driver idle and starts every "
             "actor in a new one through setup_worker.py (Ray imported twice); without one Flower's actors take "
             "the workers Ray has already started. The round-0 evaluation and TensorBoard then run while the "
             "workers import, so round 1 is *sent* later than before but *trained* earlier."]
    if "ray-baseline" in med:
        base = med["ray-baseline"]
        key = "→ round 1 done (s after launch)"
        lines[-1] += (f" Round 1 is done {base[key] - ray[key]:.1f} s sooner ({ray[key]:.1f} s against {base[key]:.1f} s), "
                      f"end to end {base['→ end to end (s)'] - ray['→ end to end (s)']:.1f} s sooner.")
    lines += ["", f"**Why round 1 is not done within 10 s of launch on {cpus} CPUs.** Until round 1 was done, the "
              f"run's processes used {total:.1f} CPU-seconds: the driver {cpu(ROLES[0]):.1f} (importing torch, timm, "
              f"Opacus, Ray and Flower is most of it), Flower's actors {cpu(ROLES[1]):.1f} (each imports Ray, Flower "
              "and the ClientApp's torch, timm and fedemb before it trains: the worker rows above), Ray's own processes "
              f"{cpu(ROLES[3]):.1f} (GCS, raylet, the dashboard head, two monitors and two agents: `ray.init` starts "
              f"them all and waits for most, whatever its options) and idle Ray workers {cpu(ROLES[2]):.1f}. On {cpus} CPUs that "
              f"alone takes at least {total / cpus:.1f} s however the work overlaps"
              f"{', more than the 10 s asked for' if total / cpus > 10 else ''}. "
              "The chain is also serial where it matters: the actors exist only after "
              "`ray.init` returns, and each imports its ClientApp only when round 1's message reaches it."]
    if "inprocess" in med:
        lines[-1] += (" The in-process engine, which imports the same library once and starts no process, finishes "
                      f"round 1 {med['inprocess']['→ round 1 done (s after launch)']:.1f} s after launch and gives the "
                      "same model and ledger, byte for byte (above), so `simulation.engine = \"auto\"`, the default, "
                      "runs in process on a machine of at most 2 CPUs (with no Ray address and no GPU shares). Its "
                      "nodes train one after another, each with the one torch thread a Ray actor would have: more "
                      "threads make this small model's steps several times slower as soon as anything else runs "
                      "(4.4 ms a step with one thread, 23 to 35 ms with two, beside one busy process on these "
                      "2 CPUs), and would change the bits.")
    lines += ["", "Left as they are, and why: timm imports torchvision, whose `ops` import `torch._dynamo` (the "
              "timm row): fedemb's own LeNets could be built without timm, but `torch.optim` imports "
              "`torch._dynamo` at its first use in every worker anyway, so most of that cost would move into "
              "round 1's training rather than go. The strategy polls for replies every 5 % of the time it has waited "
              "(at least every second: strategies/reply_collection.py), so a round ends at most 5 % after its last "
              "reply, where it used to last a whole number of seconds. The round-0 evaluation, "
              "which the run driver and then the strategy's `evaluate_fn(0)` used to both compute, now runs once."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (at least 2: one steady round)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--baseline", default="HEAD", help="the git revision whose BASELINE_FILES make ray-baseline")
    ap.add_argument("--sweep-runs", type=int, default=0, help="also measure a sweep of this many runs")
    ap.add_argument("--sweep-repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    args.command = "python scripts/benchmark_startup.py " + " ".join(sys.argv[1:])
    args.baseline_hash = subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedemb-startup-") as tmp:
        work = args.work or Path(tmp)
        (work / "site").mkdir(parents=True, exist_ok=True)
        (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        overlay = work / "overlay"
        overlay_from(args.baseline, overlay)
        cache = work / "cache"
        arms: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for i in range(args.repeats):
            for arm in args.arms:
                r = simulate_arm(arm, args.rounds, work / f"{arm}-{i}", cache, overlay)
                arms[arm].append(r)
                print(f"repeat {i + 1}, {arm}: round 1 sent {r['phases']['→ round 1 sent (s after launch)']:.1f} s, "
                      f"training {r['phases']['→ round 1 training on every worker (s after launch)']:.1f} s, "
                      f"round 1 done {r['phases']['→ round 1 done (s after launch)']:.1f} s, "
                      f"end {r['phases']['→ end to end (s)']:.1f} s", flush=True)
        checks = identity_checks(arms)
        write_section(args.out, section(args, arms, checks, None, time.monotonic() - started))
        if args.sweep_runs:
            sweep = run_sweep(args, work, cache)
            write_section(args.out, section(args, arms, checks, sweep, time.monotonic() - started))


def write_section(out: Path, text: str) -> None:
    from fedemb.report.doc_sections import write_section as write

    write(out, SECTION, text)
    print(text)
    print(f"written to {out}", flush=True)


def identity_checks(arms: dict[str, list[dict]]) -> list[str]:
    """Byte-identity of every arm's seeded outputs with ray-baseline's, and processes left behind."""
    lines = []
    if "ray-baseline" in arms:
        reference = arms["ray-baseline"][0]["run_dir"]
        for arm, results in arms.items():
            same = sum(identical(reference, r["run_dir"]) for r in results)
            lines.append(f"- {ARMS[arm]['label']}: checkpoints/final.pt and privacy.json byte-identical to the "
                         f"baseline's in {same} of {len(results)} runs.")
    left = [leftover for results in arms.values() for r in results for leftover in r["leftovers"]]
    lines.append(f"- Processes left running after a run: {len(left)}" + (f" ({'; '.join(left[:3])})" if left else "."))
    return lines


def run_sweep(args, work: Path, cache: Path) -> dict:
    results = {"cold": [], "warm": []}
    for i in range(args.sweep_repeats):
        for key in ("cold", "warm"):
            r = sweep_arm(key == "warm", args.sweep_runs, args.rounds, work / f"sweep-{key}-{i}", cache)
            results[key].append(r)
            print(f"sweep repeat {i + 1}, {key}: runs {[round(s, 1) for s in r['run_seconds']]} s, "
                  f"whole {r['wall']:.1f} s", flush=True)
    pairs = [(a, b) for c, w in zip(results["cold"], results["warm"]) for a, b in zip(c["run_dirs"], w["run_dirs"])]
    same = sum(identical(a, b) for a, b in pairs)
    left = [x for rs in results.values() for r in rs for x in r["leftovers"]]
    check = (f"Each run's checkpoints/final.pt and privacy.json byte-identical with and without the warm Ray: "
             f"{same} of {len(pairs)}; processes left running after a sweep: {len(left)}.")
    return {key: {"per_run": statistics.median(s for r in rs for s in r["run_seconds"]),
                  "wall": statistics.median(r["wall"] for r in rs)} for key, rs in results.items()} | {"check": check}


if __name__ == "__main__":
    main()
