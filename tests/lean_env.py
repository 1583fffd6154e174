"""A device-sized environment in about a second: a real venv that sees only the distributions a plain
`pip install .` (pyproject's base `dependencies`) would bring, borrowed from the main venv by symlink.

What a device would lack (Ray, Opacus, TensorBoard, ...) is simply not there, so an import of it fails
as it would on the device. The repository itself comes in through a .pth file, and every console
script of those distributions (and fedemb's own) is written into dest/bin for the lean python, so a
SuperNode started from dest/bin finds `flwr-clientapp` and `flower-superexec` by name on PATH.
"""

from __future__ import annotations

import subprocess
import tomllib
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
MAIN_VENV = REPO / ".venv"


class LeanEnvError(RuntimeError):
    """The main venv cannot supply what the base dependencies need."""


def make_lean_venv(dest: Path) -> Path:
    """Builds the lean venv at `dest`; returns its python."""
    main_site = _site_packages(MAIN_VENV)
    installed = installed_distributions()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = base_closure(project["dependencies"], installed)
    subprocess.run([str(_base_python(MAIN_VENV)), "-m", "venv", "--without-pip", str(dest)], check=True)
    lean_site = _site_packages(dest)
    _link_owned_files(main_site, lean_site, installed, needed)
    (lean_site / "_fedemb_repository.pth").write_text(f"{REPO}\n")
    python = dest / "bin" / "python"
    scripts = {ep.name: ep.value for name in needed for ep in installed[name].entry_points
               if ep.group == "console_scripts"}
    scripts |= project.get("scripts", {})
    for script, target in scripts.items():
        _write_console_script(dest / "bin" / script, python, target)
    return python


def installed_distributions() -> dict[str, metadata.Distribution]:
    """The main venv's distributions by canonical name."""
    found = metadata.distributions(path=[str(_site_packages(MAIN_VENV))])
    return {canonicalize_name(d.metadata["Name"]): d for d in found}


def base_closure(requirements: list[str], installed: dict[str, metadata.Distribution]) -> set[str]:
    """Canonical names of every distribution the requirements pull in, extras and markers honoured."""
    seen: set[tuple[str, str]] = set()  # (distribution, extra or "")
    todo = [(Requirement(r), "pyproject.toml") for r in requirements]
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        if name not in installed:
            raise LeanEnvError(f"{name} (required by {wanted_by}) is not installed in {MAIN_VENV}; "
                               "run scripts/setup.sh --test")
        for extra in ("", *req.extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in installed[name].requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append((sub, name))
    return {name for name, _ in seen}


def _link_owned_files(main_site: Path, lean_site: Path, installed, needed: set[str]) -> None:
    """Links each needed distribution's files; a directory shared with an unneeded distribution (a
    namespace package, a top-level __pycache__) is made for real and linked entry by entry."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name, dist in installed.items():
        if dist.files is None:
            if name in needed:
                raise LeanEnvError(f"{name} in {main_site} has no RECORD: cannot tell which files are its own")
            continue
        for file in dist.files:
            if file.parts[0] == "..":  # scripts and data outside site-packages
                continue
            for depth in range(1, len(file.parts) + 1):
                owners[file.parts[:depth]].add(name)
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for prefix in owners:
        children[prefix[:-1]].append(prefix)

    def link(prefix: tuple[str, ...]) -> None:
        if not owners[prefix] & needed:
            return
        target, source = lean_site.joinpath(*prefix), main_site.joinpath(*prefix)
        if owners[prefix] <= needed or not source.is_dir():
            target.symlink_to(source)
            return
        target.mkdir()
        for child in children[prefix]:
            link(child)

    for top in children[()]:
        link(top)


def _write_console_script(path: Path, python: Path, target: str) -> None:
    module, _, attr = target.partition(":")
    head = attr.split(".")[0]
    path.write_text(f"#!{python}\nimport sys\nfrom {module} import {head}\nsys.exit({attr}())\n")
    path.chmod(0o755)


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise LeanEnvError(f"{venv} has no lib/python3*/site-packages: run scripts/setup.sh --test")
    return found[0]


def _base_python(venv: Path) -> Path:
    """The interpreter the main venv was made from (pyvenv.cfg), not the venv's own python."""
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    if "executable" in cfg:
        return Path(cfg["executable"])
    return Path(cfg["home"]) / f"python{cfg['version'].rsplit('.', 1)[0]}"
