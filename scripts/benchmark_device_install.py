"""What a device saves: the lean install (`pip install fedemb`, base dependencies) against the full one
(`pip install "fedemb[all]"`), each into a fresh venv, timed and measured on disk; writes docs/device-install.md.

    .venv/bin/python scripts/benchmark_device_install.py [--workdir /tmp/x] [--repeats 2] [--keep]

Both installs go through pip as configured on this machine (its local wheel folders and indexes, then
PyPI), without pip's cache, as on a fresh device. They install a snapshot of this checkout (its tracked
and untracked, not ignored, files), so the build leaves no build/ folder in the shared tree. Sizes are
disk usage (allocated blocks, hard links once), of the whole venv and of the venv without the torch
stack (torch, triton, nvidia-*, cuda-*), which is the same in both and dominates both.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "device-install.md"
TARGETS = {"lean": "", "full": "[all]"}  # name -> extras of `pip install SRC<extras>`
LISTED = 12  # distributions named in the doc, the largest


@dataclass
class Install:
    name: str
    command: str
    times: list[float]  # seconds of each repeat
    ok: bool
    log_tail: str = ""
    from_network: int = 0  # distributions pip fetched over the network (PyPI), not from this machine's folders
    from_machine: int = 0  # ... from this machine's local wheel folders and file:// indexes
    size: int = 0  # bytes on disk, the whole venv
    torch_stack: int = 0  # bytes on disk of torch, triton, nvidia-*, cuda-*
    dists: dict[str, int] | None = None  # distribution -> bytes on disk

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def time_cell(self) -> str:
        each = f" ({', '.join(f'{t:.0f}' for t in self.times)})" if len(self.times) > 1 else ""
        return f"{self.seconds:.0f} s{each}"

    @property
    def without_torch(self) -> int:
        return self.size - self.torch_stack


def disk_usage(paths, seen: set[tuple[int, int]]) -> int:
    total = 0
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def tree_usage(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = disk_usage([root], seen)
    for folder, dirs, files in os.walk(root):
        total += disk_usage([os.path.join(folder, n) for n in dirs + files], seen)
    return total


def distribution_sizes(venv: Path) -> dict[str, int]:
    site = next(venv.glob("lib/python3*/site-packages"))
    sizes = {}
    for dist in metadata.distributions(path=[str(site)]):
        files = [site / f for f in dist.files or []]
        sizes[dist.metadata["Name"].lower()] = disk_usage(files, set())
    return sizes


def is_torch_stack(name: str) -> bool:
    return name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))


def snapshot_checkout(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


def install(name: str, extras: str, source: Path, workdir: Path, keep: bool) -> Install:
    venv = workdir / name
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    spec = f"{source}{extras}"
    report = workdir / f"{name}-report.json"
    command = ["pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--report", str(report), spec]
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    shown = " ".join(["pip", "install", "--no-cache-dir", f'"CHECKOUT{extras}"' if extras else "CHECKOUT"])
    if done.returncode != 0:
        return Install(name, shown, [seconds], False, "\n".join(log.read_text().splitlines()[-15:]))
    dists = distribution_sizes(venv)
    urls = [item["download_info"]["url"] for item in json.loads(report.read_text())["install"]]
    from_network = sum(url.startswith(("http:", "https:")) for url in urls)
    result = Install(name, shown, [seconds], True, from_network=from_network, from_machine=len(urls) - from_network,
                     size=tree_usage(venv), dists=dists,
                     torch_stack=sum(size for dist, size in dists.items() if is_torch_stack(dist)))
    if not keep:
        shutil.rmtree(venv)  # one venv on disk at a time
    return result


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def table(lean: Install, full: Install) -> list[str]:
    runs = f", median of {len(lean.times)}" if len(lean.times) > 1 else ""
    rows = [(f"install time (pip, wall clock{runs})", lean.time_cell, full.time_cell, ratio(lean.seconds, full.seconds))]
    if lean.ok and full.ok:
        rows += [("venv size on disk", gb(lean.size), gb(full.size), ratio(lean.size, full.size)),
                 ("venv size without torch/nvidia/triton/cuda", mb(lean.without_torch), mb(full.without_torch),
                  ratio(lean.without_torch, full.without_torch)),
                 ("distributions in the venv (pip and fedemb included)", str(len(lean.dists)), str(len(full.dists)),
                  ratio(len(lean.dists), len(full.dists))),
                 ("installed by pip from PyPI", str(lean.from_network), str(full.from_network),
                  ratio(lean.from_network, full.from_network)),
                 ("installed by pip from this machine (wheel folder, file:// indexes)", str(lean.from_machine),
                  str(full.from_machine),
                  ratio(lean.from_machine, full.from_machine))]
    lines = ["| | lean (`fedemb`) | full (`fedemb[all]`) | lean / full |", "|---|---|---|---|"]
    return lines + [f"| {label} | {a} | {b} | {r} |" for label, a, b, r in rows]


def largest(sizes: dict[str, int], names) -> str:
    names = sorted(names, key=lambda d: -sizes[d])
    listed = ", ".join(f"{d} ({mb(sizes[d])})" for d in names[:LISTED])
    rest = sum(sizes[d] for d in names[LISTED:])
    return listed + (f", and {len(names) - LISTED} more ({mb(rest)})" if len(names) > LISTED else "")


def contents(lean: Install, full: Install) -> list[str]:
    missing = set(full.dists) - set(lean.dists)
    return [f"The full install adds {len(missing)} distributions ({mb(sum(full.dists[d] for d in missing))}), "
            f"the largest first: {largest(full.dists, missing)}.",
            "", "Besides the torch stack, the lean install's largest: "
            f"{largest(lean.dists, [d for d in lean.dists if not is_torch_stack(d)])}."]


def write_doc(lean: Install, full: Install, command: str) -> None:
    torch_version = metadata.version("torch")
    lines = [
        "# Device install: lean against full",
        "",
        f"Written by `scripts/benchmark_device_install.py` ({datetime.date.today().isoformat()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; `{command}`). "
        "Each target installed with pip into a fresh venv, without pip's cache; torch "
        f"{torch_version} and its CUDA wheels come from this machine's local wheel folder, the rest from "
        "its pip configuration (local indexes, then PyPI). CHECKOUT is a snapshot copy of this repository's "
        "checkout (as `pip install /work/main`, without writing build/ into it). Timings are wall clock on a "
        "shared machine: noisy.",
        "",
        f"- **lean**: `{lean.command}`, the base dependencies: what a device runs (Flower's SuperNode, the "
        "ClientApp, `fedemb-device`). Set up a checkout this way with `scripts/setup.sh --device`.",
        f"- **full**: `{full.command}`: adds the server, Flower's simulation engine (Ray), Opacus accounting, "
        "TensorBoard, evaluation, the audit and synthesis. `scripts/setup.sh` installs this one.",
        "",
        *table(lean, full),
        "",
    ]
    if lean.ok and full.ok:
        lines += [f"The torch stack (torch, triton, nvidia-*, cuda-*: the CUDA build this project pins) is "
                  f"{gb(lean.torch_stack)} of lean's {gb(lean.size)} and {gb(full.torch_stack)} of full's {gb(full.size)}.", "",
                  *contents(lean, full), ""]
    for failed in (i for i in (lean, full) if not i.ok):
        lines += [f"The {failed.name} install failed (a download from PyPI it needed?); the last lines of pip's output:",
                  "", "```", failed.log_tail, "```", ""]
    DOC.write_text("\n".join(lines))


def main(workdir: Annotated[Optional[Path], typer.Option(help="Where the venvs go (default: a new folder under /tmp).")] = None,
         keep: Annotated[bool, typer.Option(help="Keep the venvs (about 6 GB each).")] = False,
         repeats: Annotated[int, typer.Option(min=1, help="Install each target this many times, alternating; "
                                                     "the time reported is the median.")] = 1):
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedemb-install-", dir=workdir))
    try:
        source = snapshot_checkout(work / "fedemb")
        results: dict[str, Install] = {}
        for repeat in range(repeats):
            for name, extras in TARGETS.items():
                print(f"installing {name} ({repeat + 1}/{repeats}) ...", flush=True)
                done = install(f"{name}-{repeat}", extras, source, work, keep)
                if name in results:
                    results[name].times += done.times
                else:
                    results[name] = replace(done, name=name)
        lean, full = results["lean"], results["full"]
        print("\n".join(table(lean, full)))
        if lean.ok and full.ok:
            print("\n".join(contents(lean, full)))
        options = (f" --workdir {workdir}" if workdir else "") + (f" --repeats {repeats}" if repeats > 1 else "")
        write_doc(lean, full, "python scripts/benchmark_device_install.py" + options)
        print(f"wrote {DOC.relative_to(REPO)}")
    finally:
        if keep:
            print(f"venvs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    typer.run(main)
