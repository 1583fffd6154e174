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

from fedemb.config import read_toml
from fedemb.errors import ConfigError

COMMANDS = ("simulate", "centralized")
SPEC_KEYS = {"name", "description", "config", "set", "seeds", "group"}
GROUP_KEYS = {"label", "set", "grid", "command", "after", "before", "seeds"}
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


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


def load_spec(path: Path, variables: dict[str, str], root: Path, runs: Path) -> Spec:
    """Read and check a spec; every cell gets its run directory runs/<name>/<group>/<grid point>/seed-N."""
    raw = read_toml(path, "experiment spec")
    _known(raw, SPEC_KEYS, str(path))
    name = _string(raw, "name", str(path))
    config = root / fill(_string(raw, "config", str(path)), variables)
    if not config.is_file():
        raise ConfigError(f"{path}: config {config} not found")
    common = [fill(s, variables) for s in _strings(raw.get("set", []), f"{path}: set")]
    seeds = _seeds(raw.get("seeds", [0]), f"{path}: seeds")
    groups = raw.get("group", [])
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"{path}: needs at least one [[group]]")
    cells, labels = [], set()
    for i, group in enumerate(groups):
        where = f"{path}: group {i + 1}"
        if not isinstance(group, dict):
            raise ConfigError(f"{where} must be a table")
        _known(group, GROUP_KEYS, where)
        label = _string(group, "label", where)
        if label in labels:
            raise ConfigError(f"{where}: label {label!r} is used twice")
        labels.add(label)
        command = group.get("command", "simulate")
        if command not in COMMANDS:
            raise ConfigError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {command!r}")
        experiment_dir = {**variables, "experiment_dir": str(runs / name)}
        own = [fill(s, experiment_dir) for s in _strings(group.get("set", []), f"{where}: set")]
        grid = group.get("grid", {})
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise ConfigError(f"{where}: grid must map config keys to non-empty lists of values")
        after = [[fill(str(arg), experiment_dir, keep=("run",)) for arg in args] for args in _steps(group, "after", where)]
        before = [[fill(str(arg), experiment_dir) for arg in args] for args in _steps(group, "before", where)]
        for point in itertools.product(*grid.values()):
            params = {k: fill(v, experiment_dir) if isinstance(v, str) else v for k, v in zip(grid.keys(), point)}
            for seed in _seeds(group.get("seeds", seeds), f"{where}: seeds"):
                overrides = common + own + [f"{k}={_toml(v)}" for k, v in params.items()] + [f"run.seed={seed}"]
                run_dir = runs / name / slug(label) / (point_name(params) or "default") / f"seed-{seed}"
                cells.append(Cell(name, label, params, seed, command, config, overrides, after, before, run_dir))
    return Spec(name, str(raw.get("description", "")), cells)


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


def _steps(group: dict, key: str, where: str) -> list[list]:
    steps = group.get(key, [])
    if not isinstance(steps, list) or any(not isinstance(a, list) or not a for a in steps):
        raise ConfigError(f"{where}: {key} must be a list of fedemb argument lists, e.g. [[\"synth\", \"gmm\", \"{{run}}\"]]")
    return steps


def _known(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _string(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of \"section.key=value\" strings")
    return value


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{where} must be a non-empty list of seeds >= 0")
    return value
