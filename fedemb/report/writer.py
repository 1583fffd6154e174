"""`fedemb report`: run directories in, report.md + PNG figures + points.json out."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from fedemb.experiments import slug
from fedemb.report.aggregate import aggregate
from fedemb.report.collect import find_runs, load_run
from fedemb.report.plots import ablation_bars, epsilon_curves, ledger_bars, synthesis_curves
from fedemb.report.tables import ledger_table, noise_tables, synthesis_tables, utility_table
from fedemb.run_dir import write_json


def write_report(paths: list[Path], out: Path) -> Path:
    records = [load_run(p) for p in find_runs(paths)]
    points = aggregate(records)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# fedemb report", "",
             f"{len(records)} runs, {len(points)} grid points. Machine: {machine()}. "
             "Means ± sample standard deviation over seeds; held-out users, all pairs. Run times are "
             "server-private (each run's private/summary.json) and not reported here.", ""]
    for experiment in sorted({p.experiment for p in points}):
        pts = [p for p in points if p.experiment == experiment]
        name = slug(experiment)
        lines += [f"## {experiment}", "", f"{sum(p.seeds for p in pts)} runs.", "", utility_table(pts), ""]
        figures = [epsilon_curves(pts, f"{experiment}: utility against ε", out / f"{name}-epsilon.png"),
                   ablation_bars(pts, f"{experiment}: ablations", out / f"{name}-ablations.png")]
        noise = noise_tables(pts)
        if noise:
            lines += ["### With and without noise", "", noise, ""]
        synth = synthesis_tables(pts)
        if synth:
            lines += ["### Synthetic data", "", "Accuracy on real held-out data, mean ± sample standard deviation "
                      "over the releases of each condition. Every DP release is recorded in the run's ledger before "
                      "its noise is drawn; the run's ledger ε after every release is what publishing them all costs.", ""]
            for title, table in synth:
                lines += [f"#### {title[0].upper()}{title[1:]}", "", table, ""]
            figures.append(synthesis_curves(pts, experiment, out / f"{name}-synthesis.png"))
        ledger = ledger_table(pts)
        if ledger:
            lines += ["### Privacy ledger per stage", "", ledger, ""]
            figures.append(ledger_bars(pts, f"{experiment}: ε per ledger stage", out / f"{name}-ledger.png"))
        lines += [f"![{f.stem}]({f.name})" for f in figures if f is not None] + [""]
        lines += ["Runs:", ""] + [f"- `{os.path.relpath(r.path)}` ({r.group}, {p.label}, seed {r.seed})"
                                  for p in pts for r in p.runs] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    write_json(out / "points.json", {"points": [_point_json(p) for p in points]})
    return report


def machine() -> str:
    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _point_json(p) -> dict:
    return {"experiment": p.experiment, "group": p.group, "method": p.method, "params": p.params, "seeds": p.seeds,
            "epsilon": p.epsilon.mean, "projected_epsilon": p.projected_epsilon.mean if p.projected_epsilon else None,
            **{m: {"mean": s.mean, "std": s.std} for m, s in p.metrics.items()},
            "ledger_epsilon": p.ledger_epsilon.mean,
            "synthesis": [{"kind": k, "condition": condition, "classifier": label, "releases": s.accuracy.n,
                           "accuracy": s.accuracy.mean, "accuracy_std": s.accuracy.std, "epsilon": s.epsilon.mean,
                           "ledger_epsilon_after": s.epsilon_total.mean, "epsilon_unit": s.unit,
                           "measures": {m: v.mean for m, v in s.measures.items()}}
                          for (k, condition, label), s in p.synthesis.items()],
            "runs": [str(r.path) for r in p.runs]}
