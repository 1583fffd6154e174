"""DP against noise off, same config, several seeds, side by side; writes docs/noise-ablation.md.

    .venv/bin/python scripts/noise_ablation.py [-c simulations/configs/quickstart.toml] [--seeds 0 1 2]
        [--variant 'k=4: sampling.users_per_client=4 privacy.noise_multiplier=1.6' ...]

Each run is a real `fedemb simulate` (Flower on Ray), called through the Python API (docs/api.md). The
seed changes the split, the initial model, the sampling and the noise draws, so the spread over seeds is
the figure to compare differences with.
A variant is the config with more overrides; every variant runs both arms on every seed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedemb.cli import api
from fedemb.errors import FedembError

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("recall_at_1", "tar_at_far_1e-3", "tar_at_far_1e-1")
ARMS = {"DP": [], "noise off": ["privacy.noise_multiplier=0"]}


def run_once(config: Path, overrides: list[str], run_dir: Path) -> dict:
    try:
        return dict(api.simulate(api.load_config(config, overrides), run_dir, show_progress=False).results)
    except FedembError as exc:
        raise SystemExit(f"run failed ({' '.join(overrides)}): {exc}") from None


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--variant must look like 'name: section.key=value ...', got {text!r}")
    return name.strip(), overrides.split()


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(config_name: str, args, variants: dict[str, list[str]], rows: dict, seconds: float) -> str:
    lines = [f"# DP against noise off: {config_name}", "",
             f"Written by `scripts/noise_ablation.py` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
             f"{seconds:.0f} s; `{args.command}`). Overrides for all runs: {' '.join(args.overrides) or 'none'}. "
             f"Mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; the seed changes the "
             "split, the initial model, sampling and noise.", ""]
    if len(variants) > 1:
        lines += ["Variants:", ""] + [f"- **{v}**: {' '.join(o) or 'the config as it is'}" for v, o in variants.items()] + [""]
    lines += ["| variant | model | ε | " + " | ".join(METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for variant in variants:
        untrained = rows[variant]["DP"].values()  # both arms start from the same model for a given seed
        lines.append(f"| {variant} | untrained | – | "
                     + " | ".join(mean_std([r["initial"][m] for r in untrained]) for m in METRICS) + " |")
        for arm in ARMS:
            by_seed = rows[variant][arm]
            eps = {float(r["privacy"]["epsilon"]) for r in by_seed.values()}
            lines.append(f"| {variant} | {arm} | {', '.join(f'{e:.3g}' for e in sorted(eps))} | "
                         + " | ".join(mean_std([r["final"][m] for r in by_seed.values()]) for m in METRICS) + " |")
    lines += ["", "Per seed (final metrics; DP − untrained, and noise off − DP):", "",
              "| variant | seed | comparison | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for variant in variants:
        for seed in args.seeds:
            dp, off = rows[variant]["DP"][seed], rows[variant]["noise off"][seed]
            lines.append(f"| {variant} | {seed} | DP − untrained | "
                         + " | ".join(f"{dp['final'][m] - dp['initial'][m]:+.3f}" for m in METRICS) + " |")
            lines.append(f"| {variant} | {seed} | noise off − DP | "
                         + " | ".join(f"{off['final'][m] - dp['final'][m]:+.3f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "simulations/configs/quickstart.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], help="'name: section.key=value ...'")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/noise-ablation.md")
    args = parser.parse_args()
    args.command = " ".join(["python scripts/noise_ablation.py", *(shlex.quote(a) for a in sys.argv[1:])])
    variants = {"config": []} | dict(parse_variant(v) for v in args.variant)

    rows = {v: {arm: {} for arm in ARMS} for v in variants}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for variant, extra_variant in variants.items():
            for seed in args.seeds:
                for arm, extra_arm in ARMS.items():
                    run_dir = Path(tmp) / f"{len(os.listdir(tmp))}"
                    res = run_once(args.config, [*args.overrides, *extra_variant, f"run.seed={seed}", *extra_arm], run_dir)
                    rows[variant][arm][seed] = res
                    print(f"{variant}: seed {seed} {arm:9s} initial recall@1 {res['initial']['recall_at_1']:.3f} -> "
                          + "  ".join(f"{m} {res['final'][m]:.3f}" for m in METRICS)
                          + f"  epsilon {float(res['privacy']['epsilon']):.3g}", flush=True)

    name = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    text = report(str(name), args, variants, rows, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
