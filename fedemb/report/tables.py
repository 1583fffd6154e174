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


SYNTHESIS_KINDS = {"gmm": "DP Gaussian mixture and its baselines (`fedemb synth gmm`)",
                   "invert": "statistics inversion (`fedemb synth invert`)",
                   "custom": "customized synthesis (`fedemb synth custom`)",
                   "dataset": "synthetic image datasets (`fedemb synth dataset`): fresh classifiers trained on them alone"}


MEASURE_ORDER = ("pixel MI", "cos", "")  # custom synthesis: what was shared, how close, how many bytes


def synthesis_tables(points: list[Point]) -> list[tuple[str, str]]:
    """(title, table) per synthesis kind: a row per grid point and released condition (its target ε, or
    for custom synthesis what the user shared), a column per classifier: accuracy on real held-out data,
    mean ± sample std over the releases of that condition (the runs' seeds, and repeated releases on each
    run). The run's ledger after every release is what publishing all of them costs."""
    out = []
    for kind, title in SYNTHESIS_KINDS.items():
        keys = [(p, condition) for p in points
                for condition in dict.fromkeys(condition for k, condition, _ in p.synthesis if k == kind)]
        if not keys:
            continue
        classifiers = list(dict.fromkeys(c for p in points for k, _, c in p.synthesis if k == kind))
        measures = sorted({m for p in points for (k, _, _), s in p.synthesis.items() if k == kind for m in s.measures},
                          key=lambda m: (next(i for i, word in enumerate(MEASURE_ORDER) if word in m), m))
        rows = []
        for p, condition in keys:
            found = {c: p.synthesis[(kind, condition, c)] for c in classifiers if (kind, condition, c) in p.synthesis}
            first = next(iter(found.values()))
            if kind == "custom":  # the device's own budget, not the run's ledger
                spent = [_eps(first.epsilon.mean)]
                extra = [first.measures[m].text(0 if m == "bytes uploaded" else 2) if m in first.measures else "–"
                         for m in measures]
            else:
                spent = [f"{_eps(p.ledger_epsilon.mean)} (training {_eps(p.epsilon.mean)}; δ = {p.runs[0].delta:.3g})"]
                extra = []
            rows.append([p.group, p.label, condition, str(first.accuracy.n), *spent,
                         *(found[c].accuracy.text() if c in found else "–" for c in classifiers), *extra])
        spent_header = ("ε per reference image (the device's own budget)" if kind == "custom"
                        else "run's ledger ε after every release")
        custom = kind == "custom"
        out.append((title, markdown(["group", "grid point", "shared" if custom else "released",
                                     "tasks" if custom else "releases", spent_header, *classifiers, *measures], rows)))
    return out


def noise_tables(points: list[Point]) -> str:
    """For each group that trains with noise and without (a grid point whose ε is ∞, e.g.
    privacy.noise_multiplier = 0): the untrained model, each noised point and noise off, mean ± sample std
    over seeds, and DP ÷ noise off; then per seed, DP − untrained and noise off − DP."""
    summary, per_seed = [], []
    for (_, group), pts in _by_group(points).items():
        off = [p for p in pts if math.isinf(p.epsilon.mean) and not p.method.startswith("centralized")]
        noised = [p for p in pts if math.isfinite(p.epsilon.mean)]
        if len(off) != 1 or not noised:
            continue
        off = off[0]
        summary.append([group, "untrained", "–", *(off.initial[m].text() for m in EVAL_METRICS)])
        for p in noised:
            summary.append([group, f"DP ({p.label})", _eps(p.epsilon.mean), *(p.metrics[m].text() for m in EVAL_METRICS)])
        summary.append([group, f"noise off ({off.label})", "∞", *(off.metrics[m].text() for m in EVAL_METRICS)])
        for p in noised:
            summary.append([group, f"DP ({p.label}) ÷ noise off", "", *(
                f"{p.metrics[m].mean / off.metrics[m].mean:.2f}" if off.metrics[m].mean else "–" for m in EVAL_METRICS)])
        unnoised = {r.seed: r for r in off.runs}
        for p in noised:
            for run in p.runs:
                if run.seed not in unnoised:
                    continue
                gain = [run.final[m] - run.initial[m] for m in EVAL_METRICS]
                cost = [unnoised[run.seed].final[m] - run.final[m] for m in EVAL_METRICS]
                per_seed.append([group, p.label, str(run.seed), *(f"{g:+.3f} / {c:+.3f}" for g, c in zip(gain, cost))])
    if not summary:
        return ""
    metrics = [EVAL_LABELS[m] for m in EVAL_METRICS]
    return "\n\n".join([
        markdown(["group", "model", "ε", *metrics], summary),
        "Per seed: DP − untrained / noise off − DP.",
        markdown(["group", "DP grid point", "seed", *metrics], per_seed)])


def _by_group(points: list[Point]) -> dict[tuple[str, str], list[Point]]:
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.experiment, p.group), []).append(p)
    return groups


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
