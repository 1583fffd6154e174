"""Run an experiment's cells (fedemb.experiments) one after another, each as `python -m fedemb ...`.

A cell whose results.json exists is skipped, and so is a `before`/`after` step whose --out is finished
(a file, or a folder holding its *results.json): a killed sweep continues where it stopped. A step killed
part-way runs again; its unfinished folder is kept aside (OUT.unfinished-N), and the ledger keeps the
release it had recorded. Each run directory gets experiment.json (experiment, group,
grid point, seed, overrides): what `fedemb report` groups by. Its wall time is server-private.

Ray kept warm (SweepRay): the training runs that would each start and stop a local Ray join one that
the sweep starts when the first of them needs it (fedemb.flower_env.WarmRay) and stops at its end. Each run
is still a process of its own, started the same way, and trains the same model.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from fedemb.errors import FedembError
from fedemb.experiments import Cell
from fedemb.flower_env import WarmRay
from fedemb.run_dir import PRIVATE_DIR, write_json, write_private_json

LOG_FILE = "experiments.log"


def fedemb_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedemb", *args]


def train_command(cell: Cell, ray_address: str = "") -> list[str]:
    sets = [arg for o in cell.overrides for arg in ("--set", o)]
    joins = ["--ray-address", ray_address] if ray_address else []
    return fedemb_command([cell.command, "--config", str(cell.config), *sets, "--run-dir", str(cell.run_dir), *joins])


def starts_own_ray(cell: Cell) -> bool:
    """Whether the cell's training run would start (and stop) a local Ray of its own."""
    from fedemb.config import load_config

    if cell.command != "simulate":
        return False
    from fedemb.flower_env import resolved_engine
    from fedemb.run_setup import planned_virtual_clients

    try:
        cfg = load_config(cell.config, cell.overrides)
        planned = planned_virtual_clients(cfg) if cfg.simulation.engine == "auto" else 0
    except FedembError:  # the run fails on its own, with its own message
        return False
    return resolved_engine(cfg, planned_virtual_clients=planned) == "ray" and not cfg.simulation.ray_address


class SweepRay:
    """The sweep's warm Ray: started for the first training run that would start its own, joined by it and
    the others like it (`fedemb simulate --ray-address`), stopped by close(). Disabled: every run starts
    its own, as a run started alone does."""

    def __init__(self, cwd: Path, enabled: bool = True):
        self.cwd, self.enabled = cwd, enabled
        self.warm: WarmRay | None = None

    def address_for(self, cell: Cell) -> str:
        if not self.enabled or not starts_own_ray(cell):
            return ""
        if self.warm is not None and not self.warm.alive():
            print("warning: the sweep's Ray has stopped; starting it again", file=sys.stderr, flush=True)
            self.close()
        if self.warm is None:
            try:
                self.warm = WarmRay(self.cwd)
            except RuntimeError as exc:  # the runs start their own, as they would alone
                print(f"warning: {exc}; each run starts its own Ray", file=sys.stderr, flush=True)
                self.enabled = False
                return ""
        return self.warm.address

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()
            self.warm = None

    def __enter__(self) -> SweepRay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_commands(steps: list[list[str]], run_dir: Path) -> list[tuple[list[str], Path | None]]:
    """Each step's command and the output that marks it done (its --out, if it names one)."""
    out = []
    for args in steps:
        args = [a.replace("{run}", str(run_dir)) for a in args]
        target = Path(args[args.index("--out") + 1]) if "--out" in args[:-1] else None
        out.append((fedemb_command(args), target))
    return out


def cell_commands(cell: Cell) -> list[str]:
    """What running the cell would run, as shell lines (for a dry run)."""
    return ([f"before: {shlex.join(command)}" for command, _ in step_commands(cell.before, cell.run_dir)]
            + [shlex.join(train_command(cell))]
            + [f"  {shlex.join(command)}" for command, _ in step_commands(cell.after, cell.run_dir)])


def run_cell(cell: Cell, log: TextIO, cwd: Path, ray: SweepRay | None = None) -> float:
    """Run what of the cell is not done yet, commands in `cwd` with their output in `log`, its training
    run on the sweep's warm Ray when `ray` has one for it; its seconds."""
    started = time.monotonic()
    for command, target in step_commands(cell.before, cell.run_dir):
        if not step_done(target, log):
            _call(command, log, cwd)
    if not (cell.run_dir / "results.json").is_file():
        if cell.run_dir.exists():  # a cell killed part-way: seeded, so starting it again gives the same run
            log.write(f"restarting the unfinished {cell.run_dir}\n")
            shutil.rmtree(cell.run_dir)
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(cell.run_dir / "experiment.json", cell.facts)
        _call(train_command(cell, ray.address_for(cell) if ray else ""), log, cwd)
    for command, target in step_commands(cell.after, cell.run_dir):
        if not step_done(target, log):
            _call(command, log, cwd)
    seconds = time.monotonic() - started
    timing = cell.run_dir / PRIVATE_DIR / "experiment-timing.json"  # run times are server-private
    before = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else 0.0
    write_private_json(cell.run_dir, timing.name, {"wall_seconds": before + seconds})
    return seconds


def step_done(target: Path | None, log: TextIO) -> bool:
    """Whether a step's output is finished. An unfinished folder is moved aside so that the step can run again."""
    if target is None or not target.exists():
        return False
    if target.is_file() or any(target.glob("*results.json")) or (target / "datasheet.json").is_file():
        return True
    aside = next(target.with_name(f"{target.name}.unfinished-{i}") for i in range(1, 10_000)
                 if not target.with_name(f"{target.name}.unfinished-{i}").exists())
    target.rename(aside)
    log.write(f"{target} was left unfinished: moved to {aside}, running the step again\n")
    return False


def _call(command: list[str], log: TextIO, cwd: Path) -> None:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    done = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise FedembError(f"`{shlex.join(command[2:])}` failed (exit {done.returncode}); see the log")
