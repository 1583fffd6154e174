"""DP against noise off, same config, several seeds, side by side; writes docs/noise-ablation.md.

    .venv/bin/python scripts/noise_ablation.py [-c simulations/configs/quickstart.toml] [--seeds 0 1 2]

Each run is a real `fedemb simulate` (Flower on Ray). The seed changes the split, the initial model,
the sampling and the noise draws, so the spread over seeds is the figure to compare differences with.
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
METRICS = ("recall_at_1", "tar_at_far_1e-3", "tar_at_far_1e-1")
ARMS = {"DP": [], "noise off": ["privacy.noise_multiplier=0"]}


def run_once(config: Path, overrides: list[str], run_dir: Path) -> dict:
    fedemb = Path(sys.executable).parent / "fedemb"
    cmd = [str(fedemb), "simulate", "-c", str(config), "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # `fedemb` sets the offline environment
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(overrides)}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "results.json").read_text())


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "simulations/configs/quickstart.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/noise-ablation.md")
    args = parser.parse_args()

    rows: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm, extra in ARMS.items():
                run_dir = Path(tmp) / f"{arm.replace(' ', '-')}-{seed}"
                res = run_once(args.config, [*args.overrides, f"run.seed={seed}", *extra], run_dir)
                rows[arm][seed] = res
                print(f"seed {seed} {arm:9s} initial recall@1 {res['initial']['recall_at_1']:.3f} -> "
                      + "  ".join(f"{m} {res['final'][m]:.3f}" for m in METRICS)
                      + f"  epsilon {float(res['privacy']['epsilon']):.3g}  ({res['wall_seconds']:.0f} s)", flush=True)

    lines = [f"# DP against noise off: {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}",
             "", f"Written by `scripts/noise_ablation.py` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
             f"{time.monotonic() - started:.0f} s). Overrides: {' '.join(args.overrides) or 'none'}. "
             "Mean ± standard deviation over seeds "
             f"{', '.join(map(str, args.seeds))}; the seed changes the split, the initial model, sampling and noise.", "",
             "| model | ε | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    untrained = rows["DP"].values()  # both arms start from the same model for a given seed
    lines.append("| untrained | – | " + " | ".join(mean_std([r["initial"][m] for r in untrained]) for m in METRICS) + " |")
    for arm, by_seed in rows.items():
        eps = {float(r["privacy"]["epsilon"]) for r in by_seed.values()}
        lines.append(f"| {arm} | {', '.join(f'{e:.3g}' for e in sorted(eps))} | "
                     + " | ".join(mean_std([r["final"][m] for r in by_seed.values()]) for m in METRICS) + " |")
    lines += ["", "Per seed (final metrics; DP − untrained, and noise off − DP):", "",
              "| seed | comparison | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for seed in args.seeds:
        dp, off = rows["DP"][seed], rows["noise off"][seed]
        lines.append(f"| {seed} | DP − untrained | "
                     + " | ".join(f"{dp['final'][m] - dp['initial'][m]:+.3f}" for m in METRICS) + " |")
        lines.append(f"| {seed} | noise off − DP | "
                     + " | ".join(f"{off['final'][m] - dp['final'][m]:+.3f}" for m in METRICS) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
