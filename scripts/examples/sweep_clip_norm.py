"""Sweep the clip norm C with fedemb's Python API: one quickstart run per value, one line each (docs/api.md).

    .venv/bin/python scripts/examples/sweep_clip_norm.py [section.key=value ...]

The arguments override the config of every run, e.g. run.rounds=5 or simulation.engine=inprocess.
"""
import sys
from pathlib import Path

from fedemb.cli import api

cfg = api.load_config(Path(__file__).resolve().parents[2] / "simulations/configs/quickstart.toml", sys.argv[1:])
for clip_norm in (0.2, 0.4):
    run = api.simulate(api.override(cfg, {"privacy.clip_norm": clip_norm, "run.name": f"clip-{clip_norm}"}))
    print(f"clip_norm={clip_norm} recall@1={run.final['recall_at_1']:.3f} epsilon={run.epsilon:.2f} {run.run_dir}")
