"""Runs of one grid point (same experiment, group and parameters; different seeds) become one point:
means and spreads (sample standard deviation; 0 with one seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedemb.experiments import show_value
from fedemb.report.collect import METRICS, RunRecord

EPSILON_KEY = "privacy.target_epsilon"


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        values = [float(v) for v in values]
        if any(math.isinf(v) for v in values):
            return cls(math.inf, 0.0, len(values))
        arr = np.asarray(values, dtype=np.float64)
        return cls(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))

    def text(self, digits: int = 3) -> str:
        if math.isinf(self.mean):
            return "∞"
        if math.isnan(self.mean):
            return "–"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass
class Point:
    experiment: str
    group: str
    method: str
    params: dict
    runs: list[RunRecord]
    metrics: dict[str, Stat]
    epsilon: Stat  # training, real population
    projected_epsilon: Stat | None
    # (kind, output folder, classifier) -> accuracy, ε after it, and the unit of that ε
    synthesis: dict[tuple[str, str, str], tuple[Stat, Stat, str]] = field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={show_value(v)}" for k, v in self.params.items()) or "–"

    @property
    def on_epsilon_grid(self) -> bool:
        return set(self.params) == {EPSILON_KEY}

    @property
    def plotted_epsilon(self) -> float:
        """Where this point sits on an ε axis: the projected ε where there is one, else the real one."""
        return self.projected_epsilon.mean if self.projected_epsilon else self.epsilon.mean


def aggregate(records: list[RunRecord]) -> list[Point]:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        key = (r.experiment, r.group, tuple(sorted((k, repr(v)) for k, v in r.params.items())))
        groups.setdefault(key, []).append(r)
    points = []
    for (experiment, group, _), runs in groups.items():
        runs.sort(key=lambda r: (r.seed is None, r.seed))
        projected = [r.projected_epsilon for r in runs if r.projected_epsilon is not None]
        point = Point(experiment, group, runs[0].method, runs[0].params, runs,
                      {m: Stat.of([r.final[m] for r in runs]) for m in METRICS},
                      Stat.of([r.epsilon for r in runs]), Stat.of(projected) if projected else None)
        keys = {(s.kind, s.folder, label) for r in runs for s in r.synthesis for label in s.accuracy}
        for kind, folder, label in sorted(keys):
            found = [(s.accuracy[label], s.epsilon_total, s.unit) for r in runs for s in r.synthesis
                     if (s.kind, s.folder) == (kind, folder) and label in s.accuracy]
            point.synthesis[(kind, folder, label)] = (Stat.of([a for a, _, _ in found]),
                                                      Stat.of([e for _, e, _ in found]), found[0][2])
        points.append(point)
    points.sort(key=lambda p: (p.experiment, p.group, _order(p.params)))
    return points


def _order(params: dict) -> tuple:
    return tuple((k, (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)))
                 for k, v in sorted(params.items()))
