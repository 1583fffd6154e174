"""Runs of one grid point (same experiment, group and parameters; different seeds) become one point:
means and spreads (sample standard deviation; 0 with one seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedemb.experiments import show_value
from fedemb.report.collect import METRICS, RunRecord, Synthesis

EPSILON_KEY = "privacy.target_epsilon"


@dataclass
class Stat:
    mean: float
    std: float
    n: int
    lo: float = math.nan  # the smallest and largest value
    hi: float = math.nan

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        values = [float(v) for v in values]
        if any(math.isinf(v) for v in values):
            return cls(math.inf, 0.0, len(values), math.inf, math.inf)
        arr = np.asarray(values, dtype=np.float64)
        return cls(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr),
                   float(arr.min()), float(arr.max()))

    def text(self, digits: int = 3) -> str:
        if math.isinf(self.mean):
            return "∞"
        if math.isnan(self.mean):
            return "–"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"

    def range_text(self, digits: int = 3) -> str:
        """The mean and, over several values, their range: "0.581 (0.52–0.64)"."""
        if self.n < 2 or not math.isfinite(self.mean):
            return self.text(digits)
        return f"{self.mean:.{digits}f} ({self.lo:.2f}–{self.hi:.2f})"


@dataclass
class SynthesisPoint:
    """One classifier of one synthesis condition, over every release of it at a grid point (its runs'
    seeds, and repeated releases on each run)."""

    accuracy: Stat
    epsilon: Stat  # the release's own ε (custom: per reference image)
    epsilon_total: Stat  # the run's ledger right after it
    unit: str
    measures: dict[str, Stat] = field(default_factory=dict)


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
    synthesis: dict[tuple[str, str, str], SynthesisPoint] = field(default_factory=dict)  # (kind, condition, classifier)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def ledger_epsilon(self) -> Stat:
        """The runs' ledgers after every stage: what publishing all their outputs costs."""
        return Stat.of([r.ledger_epsilon for r in self.runs])

    @property
    def initial(self) -> dict[str, Stat]:
        """The untrained model's metrics."""
        return {m: Stat.of([r.initial[m] for r in self.runs]) for m in METRICS}

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
        point.synthesis = _synthesis_points([s for r in runs for s in r.synthesis])
        points.append(point)
    points.sort(key=lambda p: (p.experiment, p.group, _order(p.params)))
    return points


def _synthesis_points(releases: list[Synthesis]) -> dict[tuple[str, str, str], SynthesisPoint]:
    """Releases of one condition, averaged per classifier; conditions in order of kind and ε."""
    found: dict[tuple[str, str, str], list[Synthesis]] = {}
    for s in sorted(releases, key=lambda s: (s.kind, s.epsilon, s.condition)):
        for label in s.accuracy:
            found.setdefault((s.kind, s.condition, label), []).append(s)
    return {(kind, condition, label): SynthesisPoint(
        Stat.of([s.accuracy[label] for s in same]), Stat.of([s.epsilon for s in same]),
        Stat.of([s.epsilon_total for s in same]), same[0].unit,
        {m: Stat.of([s.measures[m] for s in same if m in s.measures]) for m in dict.fromkeys(
            m for s in same for m in s.measures)})
        for (kind, condition, label), same in found.items()}


def _order(params: dict) -> tuple:
    return tuple((k, (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)))
                 for k, v in sorted(params.items()))
