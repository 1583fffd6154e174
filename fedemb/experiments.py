"""Experiment specs (scripts/experiments/*.toml): a base config, groups of runs over grids and seeds,
and what runs after each training run (synthesis). `fedemb experiments run` runs them; every run
directory gets an experiment.json saying which experiment, group, grid point and seed it is, which is
what `fedemb report` groups by.

    name = "mnist-epsilon"
    config = "simulations/configs/mnist.toml"
    set = ["data.path={data}/mnist"]          # {name}: filled from `--var name=value`
    seeds = [0, 1, 2]

    [[group]]
    label = "DP-FedEmb"
    set = ["client.head=global"]
    grid = { "privacy.target_epsilon" = [1, 2, 4, 8] }
    after = [["synth", "gmm", "{run}", "--out", "{run}/synth/gmm"]]
    # several releases on each trained run: an after step runs once per combination of the after_grid
    # placeholders it names (here 2 x 3 synthesis releases), each with its own --out
    # after = [["synth", "gmm", "{run}", "--set", "synth.epsilon={epsilon}", "--out", "{run}/synth/gmm-{epsilon}-{repeat}"]]
    # after_grid = { epsilon = [1, 4], repeat = [0, 1, 2] }
    # once, before the group's runs; {experiment_dir} is runs/<name>
    before = [["pretrain", "--config", "...", "--out", "{experiment_dir}/pretrained.pt"]]

    [[group]]
    label = "centralized"
    command = "centralized"                   # default "simulate"
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedemb.config import read_toml
from fedemb.errors import ConfigError
from fedemb.typed_config import Settings, parse

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
RESERVED = ("run", "experiment_dir")  # placeholders the runner fills
Seeds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Step = Annotated[list[str], Field(min_length=1)]
Scalar = int | float | str


class GroupSpec(Settings):
    """A [[group]] of an experiment spec: one method, run at every point of its grid and every seed."""

    label: str = Field(min_length=1)
    """the method's name in reports; also its folder (runs/<name>/<label>/...)"""
    set: list[str] = Field(default_factory=list)
    """overrides of this group, "section.key=value", after the spec's own"""
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    """config key -> values: one run per combination"""
    command: Literal["simulate", "centralized"] = "simulate"
    """what trains each run"""
    after: list[Step] = Field(default_factory=list)
    """fedemb argument lists run after each training run; "{run}" is its run directory"""
    after_grid: dict[str, Annotated[list[Scalar], Field(min_length=1)]] = Field(default_factory=dict)
    """placeholder -> values: an `after` step that names "{placeholder}" runs once per combination of the
    placeholders it names (e.g. synthesis releases at several ε on each trained run); its --out must name
    them too, so that every point has its own output"""
    before: list[Step] = Field(default_factory=list)
    """fedemb argument lists run once before the group's runs; "{experiment_dir}" is runs/<name>"""
    seeds: Seeds | None = None
    """the group's own seeds (default: the spec's)"""

    @model_validator(mode="after")
    def _after_grid_used(self) -> GroupSpec:
        where = f"group {self.label!r}: after_grid"
        for key in self.after_grid:
            if not PLACEHOLDER.fullmatch(f"{{{key}}}") or key in RESERVED:
                raise ValueError(f"{where} key {key!r} must be a placeholder name (a-z, _) other than "
                                 f"{' and '.join(RESERVED)}")
            if not any(key in step_placeholders(step) for step in self.after):
                raise ValueError(f"{where}.{key} is named by no `after` step")
        for i, step in enumerate(self.after):
            named = step_placeholders(step) & set(self.after_grid)
            out = step[step.index("--out") + 1] if "--out" in step[:-1] else None
            unnamed = sorted(named - (step_placeholders([out]) if out else set()))
            if unnamed:
                raise ValueError(f"group {self.label!r}: after[{i}] names {{{unnamed[0]}}} of after_grid, so its "
                                 "--out must name it too (each point writes its own output)")
        return self


class ExperimentSpec(Settings):
    """An experiment spec (scripts/experiments/*.toml): a base config and the groups of runs made from it.
    "{name}" placeholders are filled from `--var name=value`."""

    name: str = Field(min_length=1)
    """the experiment's folder under runs/, and its name in reports"""
    description: str = ""
    """one line for the report"""
    config: str = Field(min_length=1)
    """the base run config, relative to the fedemb checkout"""
    set: list[str] = Field(default_factory=list)
    """overrides for every run: "section.key=value" strings"""
    seeds: Seeds = Field(default_factory=lambda: [0])
    """run.seed of every grid point"""
    group: list[GroupSpec] = Field(min_length=1)
    """the methods compared ([[group]] tables)"""

    @model_validator(mode="after")
    def _labels_unique(self) -> ExperimentSpec:
        labels = [g.label for g in self.group]
        twice = next((label for label in labels if labels.count(label) > 1), None)
        if twice is not None:
            raise ValueError(f"group label {twice!r} is used twice")
        return self


@dataclass
class Cell:
    """One run of an experiment."""

    experiment: str
    group: str
    params: dict  # the grid point: config key -> value
    seed: int
    command: str
    config: Path
    overrides: list[str]
    after: list[list[str]] = field(default_factory=list)  # fedemb arguments, "{run}" is the run directory
    before: list[list[str]] = field(default_factory=list)  # fedemb arguments, run once for the group
    run_dir: Path = Path()

    @property
    def facts(self) -> dict:
        return {"experiment": self.experiment, "group": self.group, "params": self.params, "seed": self.seed,
                "command": self.command, "config": str(self.config), "overrides": self.overrides}


@dataclass
class Spec:
    name: str
    description: str
    cells: list[Cell]


def load_spec(path: Path, variables: dict[str, str], root: Path, runs: Path, seeds: list[int] | None = None) -> Spec:
    """Read and check a spec; every cell gets its run directory runs/<name>/<group>/<grid point>/seed-N.
    `seeds` replaces the spec's and the groups' own seeds (seeds can be added to a finished sweep)."""
    spec = parse(ExperimentSpec, read_toml(path, "experiment spec"), str(path))
    config = root / fill(spec.config, variables)
    if not config.is_file():
        raise ConfigError(f"{path}: config {config} not found")
    common = [fill(s, variables) for s in spec.set]
    experiment_dir = {**variables, "experiment_dir": str(runs / spec.name)}
    cells = []
    for group in spec.group:
        own = [fill(s, experiment_dir) for s in group.set]
        after = [filled for args in group.after for filled in expand_step(args, group.after_grid, experiment_dir)]
        before = [[fill(arg, experiment_dir) for arg in args] for args in group.before]
        for point in itertools.product(*group.grid.values()):
            params = {k: fill(v, experiment_dir) if isinstance(v, str) else v for k, v in zip(group.grid, point)}
            for seed in seeds or group.seeds or spec.seeds:
                overrides = common + own + [f"{k}={_toml(v)}" for k, v in params.items()] + [f"run.seed={seed}"]
                run_dir = runs / spec.name / slug(group.label) / (point_name(params) or "default") / f"seed-{seed}"
                cells.append(Cell(spec.name, group.label, params, seed, group.command, config, overrides, after,
                                  before, run_dir))
    return Spec(spec.name, spec.description, cells)


def step_placeholders(step: list[str]) -> set[str]:
    return {name for arg in step for name in PLACEHOLDER.findall(arg)}


def expand_step(step: list[str], after_grid: dict[str, list], variables: dict[str, str]) -> list[list[str]]:
    """An `after` step once per combination of the after_grid placeholders it names, in grid order;
    "{run}" stays for the runner."""
    keys = [key for key in after_grid if key in step_placeholders(step)]
    points = itertools.product(*(after_grid[key] for key in keys))
    return [[fill(arg, variables | {k: fill(str(v), variables) for k, v in zip(keys, point)}, keep=("run",))
             for arg in step] for point in points]


def fill(text: str, variables: dict[str, str], keep: tuple[str, ...] = ()) -> str:
    def value(match: re.Match) -> str:
        key = match.group(1)
        if key in keep:
            return match.group(0)
        if key not in variables:
            raise ConfigError(f"{text!r} needs {{{key}}}: pass --var {key}=VALUE")
        return variables[key]

    return PLACEHOLDER.sub(value, text)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "group"


def point_name(params: dict) -> str:
    """A grid point as a folder name: short keys, and file paths by their file name."""
    return ",".join(f"{key.split('.')[-1]}={slug(show_value(v))}" for key, v in params.items())


def show_value(value) -> str:
    text = str(value)
    if text == "":
        return "none"
    return Path(text).name if "/" in text else text


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
