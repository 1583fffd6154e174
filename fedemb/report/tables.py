"""Markdown tables of aggregated points."""

from __future__ import annotations

import math

from fedemb.monitoring.metric_names import EVAL_LABELS, EVAL_METRICS, RECALL_AT_1
from fedemb.report.aggregate import Point

NON_PRIVATE_REFERENCE = "federated (non-private)"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"


def utility_table(points: list[Point]) -> str:
    """One row per grid point. The last column compares recall@1 with the experiment's non-private
    federated run (same algorithm, no clipping or noise), where there is one."""
    reference = {p.experiment: p.metrics[RECALL_AT_1].mean for p in points
                 if p.method == NON_PRIVATE_REFERENCE and not p.params}
    rows = []
    for p in points:
        ref = reference.get(p.experiment)
        drop = "–" if ref is None or p.method == NON_PRIVATE_REFERENCE else f"{100 * (p.metrics[RECALL_AT_1].mean - ref) / ref:+.1f}%"
        rows.append([p.group, p.label, str(p.seeds), _eps(p.epsilon.mean),
                     _eps(p.projected_epsilon.mean) if p.projected_epsilon else "–",
                     *(p.metrics[m].text() for m in EVAL_METRICS), drop])
    return markdown(["group", "grid point", "seeds", "ε (this population)", "ε (projected)",
                     *(EVAL_LABELS[m] for m in EVAL_METRICS), f"{EVAL_LABELS[RECALL_AT_1]} vs non-private"], rows)


def synthesis_table(points: list[Point]) -> str:
    rows = []
    for p in points:
        for (kind, folder, label), (acc, eps, unit) in p.synthesis.items():
            spent = _eps(eps.mean) if unit == "user" else f"{_eps(eps.mean)} per {unit} (the device's own budget)"
            rows.append([p.group, p.label, f"{kind} ({folder})", label, acc.text(), spent])
    if not rows:
        return ""
    return markdown(["group", "grid point", "synthesis (folder)", "classifier", "accuracy on real held-out data",
                     "ledger ε after it (training + synthesis)"], rows)


def ledger_table(points: list[Point]) -> str:
    """Per stage of each point's first run: the stage's own ε and the ledger's ε after it."""
    rows = []
    for p in points:
        run = p.runs[0]
        if len(run.stages) < 2:
            continue
        for stage, own, total in run.stages:
            rows.append([p.group, p.label, stage, _eps(own), _eps(total)])
    if not rows:
        return ""
    return markdown(["group", "grid point", "stage", "ε of the stage", "ledger ε after it"], rows)
