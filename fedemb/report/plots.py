"""PNG figures of aggregated points (matplotlib, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedemb.monitoring.metric_names import EVAL_LABELS, RECALL_AT_1, TAR_AT_FAR_1E_3  # noqa: E402
from fedemb.report.aggregate import Point  # noqa: E402
from fedemb.report.collect import METRICS  # noqa: E402


def epsilon_curves(points: list[Point], title: str, path: Path) -> Path | None:
    """Each metric against ε, one line per group on the ε grid; groups without noise as dashed levels.
    Projected groups are placed at their projected ε, and their legend says so."""
    curves: dict[str, list[Point]] = {}
    for p in points:
        if p.on_epsilon_grid:
            curves.setdefault(p.group, []).append(p)
    if not curves:
        return None
    levels = [p for p in points if not p.params and math.isinf(p.epsilon.mean)]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for group, pts in curves.items():
            pts = sorted(pts, key=lambda p: p.plotted_epsilon)
            projected = any(p.projected_epsilon for p in pts)
            ax.errorbar([p.plotted_epsilon for p in pts], [p.metrics[metric].mean for p in pts],
                        yerr=[p.metrics[metric].std for p in pts], marker="o", capsize=3,
                        label=f"{group} ({'projected ε' if projected else 'ε on this population'})")
        for i, p in enumerate(levels):
            ax.axhline(p.metrics[metric].mean, linestyle="--", color=f"C{len(curves) + i}", label=f"{p.group} (ε = ∞)")
        _epsilon_ticks(ax, [p.plotted_epsilon for pts in curves.values() for p in pts])
        ax.set_xlabel("ε (training)")
        ax.set_ylabel(EVAL_LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def ablation_bars(points: list[Point], title: str, path: Path) -> Path | None:
    """One bar per grid point of a group that varies something other than ε."""
    pts = [p for p in points if p.params and not p.on_epsilon_grid]
    if not pts:
        return None
    shown = (RECALL_AT_1, TAR_AT_FAR_1E_3)
    fig, axes = plt.subplots(1, len(shown), figsize=(max(6, 0.9 * len(pts) + 3) * len(shown) / 1.5, 4.5), squeeze=False)
    names = [f"{p.group}\n{p.label}" for p in pts]
    for ax, metric in zip(axes[0], shown):
        ax.bar(range(len(pts)), [p.metrics[metric].mean for p in pts], yerr=[p.metrics[metric].std for p in pts],
               capsize=3, color=[f"C{sorted({q.group for q in pts}).index(p.group)}" for p in pts])
        ax.set_xticks(range(len(pts)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(EVAL_LABELS[metric])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def synthesis_curves(points: list[Point], title: str, path: Path) -> Path | None:
    """Synthetic-data accuracy, one panel per kind of DP synthesis on the run's ledger: against the
    release's own ε where a grid point released several (a sweep on one trained run), else against the
    end-to-end ledger ε after it (training + synthesis)."""
    panels: dict[tuple[str, bool], dict[str, list[tuple[float, float, float]]]] = {}
    for kind in dict.fromkeys(k for p in points for k, _, _ in p.synthesis):
        swept = any(len({c for k, c, _ in p.synthesis if k == kind}) > 1 for p in points)
        for p in points:
            for (k, _, label), s in p.synthesis.items():
                x = s.epsilon.mean if swept else s.epsilon_total.mean
                if k == kind and s.unit == "user" and math.isfinite(x):  # DP, on the run's ledger
                    line = f"{label} ({p.group}, {p.label})" if swept and len(points) > 1 else label
                    panels.setdefault((kind, swept), {}).setdefault(line, []).append((x, s.accuracy.mean, s.accuracy.std))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, ((kind, swept), lines) in zip(axes[0], panels.items()):
        for label, values in sorted(lines.items()):
            values.sort()
            ax.errorbar([v[0] for v in values], [v[1] for v in values], yerr=[v[2] for v in values], marker="o",
                        capsize=3, label=label)
        _epsilon_ticks(ax, [v[0] for values in lines.values() for v in values])
        ax.set_xlabel("ε of the release" if swept else "ledger ε (training + synthesis)")
        ax.set_ylabel("accuracy on real held-out data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{title}: {kind}")
    return _save(fig, path)


def ledger_bars(points: list[Point], title: str, path: Path) -> Path | None:
    """The ε of each ledger stage, for each point whose run has synthesis stages."""
    pts = [p for p in points if len(p.runs[0].stages) > 1]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * sum(len(p.runs[0].stages) for p in pts) + 1.5))
    labels, values = [], []
    for p in pts:
        for stage, own, _ in p.runs[0].stages:
            labels.append(f"{p.group} {p.label}: {stage}")
            values.append(own)
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ε of the stage")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _epsilon_ticks(ax, values: list[float]) -> None:
    """A log axis labelled at the ε values themselves (1, 2, 4, 8), not at powers of ten."""
    ax.set_xscale("log")
    ticks = sorted({round(v, 2) for v in values if math.isfinite(v) and v > 0})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
