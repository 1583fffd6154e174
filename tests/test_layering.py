"""Layers import only downward: the library (fedemb/) knows nothing of the strategy (strategies/), the
apps and run drivers (simulations/) or Flower's server side; the strategy knows nothing of the apps;
the CLI (the fedemb.cli package and fedemb.__main__) is the top and may import anything. The
project's modules import each other without cycles, and scripts import the installed packages
instead of patching sys.path.

Read from the source (every import statement, those inside functions too), so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedemb", "strategies", "simulations")
CLI = ("fedemb.cli", "fedemb.__main__")
SERVER_SIDE = ("strategies", "simulations", "flwr.serverapp", "flwr.server", "flwr.simulation")
PATH_EDITS = ("insert", "append", "extend")


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement of the module names: `from a.b import c` gives a.b and
    a.b.c (c may be a module); relative imports are resolved against the module's package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imported names of each project module, project modules each one imports). A module importing
    its own package (its __init__) is not an edge: Python has run that package before the module."""
    modules = project_modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    names = {m: imported_names(m, path) for m, path in modules.items()}
    graph = {m: {t for t in map(resolve, names[m]) if t and t != m and not m.startswith(t + ".")}
             for m in modules}
    return names, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) through each group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = {stack.pop()}
            while v not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_through(group, graph) for group in groups)


def _cycle_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, within the group, back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def _names(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def library_imports_upward(names: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, n) for m, imported in names.items() for n in imported
                  if m.split(".")[0] == "fedemb" and not _names(m, CLI) and _names(n, SERVER_SIDE))


def strategy_imports_apps(names: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, n) for m, imported in names.items() for n in imported
                  if m.split(".")[0] == "strategies" and _names(n, ("simulations",)))


def scripts_editing_sys_path(root: Path) -> list[str]:
    """Scripts that call sys.path.insert/append/extend or assign to sys.path (docstrings aside)."""
    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    found = []
    for path in sorted((root / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            call = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in PATH_EDITS and is_sys_path(node.func.value))
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AugAssign) else [])
            assigned = any(is_sys_path(t.value if isinstance(t, ast.Subscript) else t) for t in targets)
            if call or assigned:
                found.append(str(path.relative_to(root)))
                break
    return found


# ------------------------------------------------------------------ the project

def test_the_project_modules_import_each_other_without_cycles():
    _, graph = import_graph(ROOT)
    assert cycles(graph) == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(graph))


def test_the_library_never_imports_the_strategy_the_apps_or_flowers_server_side():
    names, _ = import_graph(ROOT)
    assert library_imports_upward(names) == []


def test_the_strategy_never_imports_the_apps():
    names, _ = import_graph(ROOT)
    assert strategy_imports_apps(names) == []


def test_no_script_inserts_into_sys_path():
    assert scripts_editing_sys_path(ROOT) == []


# ------------------------------------------------------------------ the checks can fail

def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_a_cycle_an_upward_import_and_a_sys_path_edit_in_a_small_tree(tmp_path):
    write_tree(tmp_path, {
        "fedemb/a.py": "from fedemb import b\n",
        "fedemb/b.py": "def f():\n    from fedemb.a import x  # inside a function: still an edge\n",
        "fedemb/c.py": "def g():\n    from strategies.s import S\n    from flwr import serverapp\n",
        "fedemb/ok.py": "import flwr.serverappx\nfrom flwr.app import Message\n",
        "fedemb/cli.py": "import simulations.app\nfrom flwr.simulation import run_simulation\n",
        "fedemb/cli/run.py": "from simulations.app import main\n",
        "fedemb/sub/__init__.py": "from . import d\n",
        "fedemb/sub/d.py": "from ..ok import Message\nfrom fedemb.sub import e\n",
        "fedemb/sub/e.py": "",
        "strategies/__init__.py": "from strategies.s import S\n",
        "strategies/s.py": "from fedemb.ok import Message\nfrom simulations.app import main\n",
        "simulations/app.py": "from strategies.s import S\nfrom fedemb.a import x\n",
        "scripts/patch.py": "import sys\nsys.path.insert(0, '..')\n",
        "scripts/deep/assign.py": "import sys\nsys.path[:0] = ['..']\n",
        "scripts/quiet.py": '"""Mentions sys.path.insert(0, ROOT) in words only."""\nimport sys\nprint(sys.path)\n',
    })
    names, graph = import_graph(tmp_path)
    assert cycles(graph) == [["fedemb.a", "fedemb.b", "fedemb.a"], ["simulations.app", "strategies.s", "simulations.app"]]
    assert graph["fedemb.sub.d"] == {"fedemb.ok", "fedemb.sub.e"}  # relative import resolved, own package left out
    assert "fedemb.sub" not in graph["fedemb.sub.e"] and graph["fedemb.sub"] == {"fedemb.sub.d"}
    assert library_imports_upward(names) == [("fedemb.c", "flwr.serverapp"), ("fedemb.c", "strategies.s"),
                                             ("fedemb.c", "strategies.s.S")]
    assert strategy_imports_apps(names) == [("strategies.s", "simulations.app"), ("strategies.s", "simulations.app.main")]
    assert scripts_editing_sys_path(tmp_path) == ["scripts/deep/assign.py", "scripts/patch.py"]
