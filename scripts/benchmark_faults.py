"""Simulated faults against a clean run, side by side in one command (the quickstart, worker mode).

    .venv/bin/python scripts/benchmark_faults.py [--rounds 40] [--arms clean vc-faults node-faults] [--repeats 1] [--out FILE]

Arms, each a separate `fedemb simulate` of simulations/configs/quickstart.toml (Ray, worker mode, the
same seed):
  clean        no faults (the baseline)
  vc-faults    30% of the virtual clients fail: timeout_rate = 0.15, drop_rate = 0.15 (the README's example)
  node-faults  30% of the nodes' replies are lost: node_timeout_rate = 0.15, node_drop_rate = 0.15

For each: the fraction of the planned virtual clients the server accepted (from the run's server-private
summary: the digits are public data, so the benchmark may show it), the end-to-end wall time of the
command and its ratio to the clean run, ε, and held-out recall@1 and TAR@FAR=1e-1 against the clean run's.
With --repeats R the arms run R times, interleaved (clean, vc-faults, node-faults, clean, ...), and the
wall times are the medians (a seeded run's figures are the same every time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations" / "configs" / "quickstart.toml"
FEDEMB = str(Path(sys.executable).with_name("fedemb"))
ARMS = {
    "clean": [],
    "vc-faults": ["simulation.faults.timeout_rate=0.15", "simulation.faults.drop_rate=0.15"],
    "node-faults": ["simulation.faults.node_timeout_rate=0.15", "simulation.faults.node_drop_rate=0.15"],
}


def run_arm(name: str, rounds: int, where: Path) -> dict:
    run_dir = where / name
    command = [FEDEMB, "simulate", "--config", str(QUICKSTART), "--run-dir", str(run_dir),
               "--set", f"run.rounds={rounds}"]
    for override in ARMS[name]:
        command += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=where, env=env)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: fedemb simulate failed\n{done.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    totals = json.loads((run_dir / "private" / "summary.json").read_text())["totals"]
    return {"arm": name, "wall_s": wall, "accepted": totals["virtual-clients-accepted"],
            "planned": totals["virtual-clients-planned"], "epsilon": results["privacy"]["epsilon"],
            "recall_at_1": results["final"]["recall_at_1"], "tar_at_far_1e-1": results["final"]["tar_at_far_1e-1"],
            "untrained_recall_at_1": results["initial"]["recall_at_1"],
            "rounds": results["rounds_completed"], "notice": (results.get("fault_injection") or {}).get("notice", "")}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| arm | rounds | accepted / planned virtual clients | wall time | × clean | ε | recall@1 (untrained → trained) "
             "| TAR@FAR=1e-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['rounds']} | {r['accepted']:,} / {r['planned']:,} = "
                     f"{r['accepted'] / max(1, r['planned']):.1%} | {r['wall_s']:.1f} s | "
                     f"{r['wall_s'] / base['wall_s']:.2f} | {r['epsilon']:.4g} | "
                     f"{r['untrained_recall_at_1']:.3f} → {r['recall_at_1']:.3f} | "
                     f"{r['tar_at_far_1e-1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="the quickstart's 40 by default")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="the first is the baseline the wall times are divided by")
    ap.add_argument("--repeats", type=int, default=1, help="run the arms this many times, interleaved")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    walls: dict[str, list[float]] = {name: [] for name in args.arms}
    first: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name in args.arms:
            with tempfile.TemporaryDirectory(prefix="fedemb-faults-") as tmp:
                row = run_arm(name, args.rounds, Path(tmp))
            first.setdefault(name, row)
            walls[name].append(row["wall_s"])
            print(f"{name} (repeat {repeat + 1}): {row['wall_s']:.1f} s, load average {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
    rows = [{**first[name], "wall_s": statistics.median(walls[name])} for name in args.arms]
    text = f"{table(rows)}\n\n" + "\n".join(f"- {r['arm']}: {r['notice']}" for r in rows if r["notice"])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
