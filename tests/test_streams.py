"""The stream ids of the keyed draws have one home, fedemb/privacy/streams.py: two draw sites sharing an
id under the same key would draw the same numbers (a synthesis seed equal to run.seed would have
reproduced the initial model's seed in the mixture's samples), so every id is unique, and no other
module defines one of its own.

Read from the source for the second check, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from fedemb.privacy import streams

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "fedemb" / "privacy" / "streams.py"


def test_every_stream_id_is_unique():
    ids = list(streams.STREAMS.values())
    assert streams.STREAMS and len(ids) == len(set(ids)), sorted(streams.STREAMS.items(), key=lambda kv: kv[1])
    assert all(type(i) is int and i >= 0 for i in ids)  # a 64-bit counter word each


def test_the_ids_that_seeded_runs_already_depend_on_are_kept():
    """Renumbering one of these changes every seeded federated run's sampling, noise or model."""
    assert {k: streams.STREAMS[k] for k in ("STREAM_SAMPLING", "STREAM_GROUPING", "STREAM_FAULTS",
                                            "STREAM_TRAINING", "STREAM_HEAD_ANCHORS", "STREAM_NOISE",
                                            "STREAM_TRAINING_KEY", "STREAM_MODEL_INIT", "STREAM_RUN_SECRET",
                                            "STREAM_RELEASES", "STREAM_AUDIT")} == {
        "STREAM_SAMPLING": 1, "STREAM_GROUPING": 2, "STREAM_FAULTS": 3, "STREAM_TRAINING": 4,
        "STREAM_HEAD_ANCHORS": 5, "STREAM_NOISE": 11, "STREAM_TRAINING_KEY": 21, "STREAM_MODEL_INIT": 22,
        "STREAM_RUN_SECRET": 40, "STREAM_RELEASES": 50, "STREAM_AUDIT": 31}


def defined_names(tree: ast.AST) -> set[str]:
    """Every name bound by an assignment (plain, annotated, augmented, tuple-unpacked) anywhere in a module."""
    names = set()
    for node in ast.walk(tree):
        targets = {ast.Assign: lambda n: n.targets, ast.AnnAssign: lambda n: [n.target],
                   ast.AugAssign: lambda n: [n.target], ast.NamedExpr: lambda n: [n.target]}.get(type(node))
        for target in targets(node) if targets else []:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_no_module_outside_the_registry_defines_a_stream_id():
    offenders = {}
    for package in ("fedemb", "strategies", "simulations"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == REGISTRY:
                continue
            own = sorted(n for n in defined_names(ast.parse(path.read_text(), str(path))) if n.startswith("STREAM_"))
            if own:
                offenders[str(path.relative_to(ROOT))] = own
    assert not offenders, f"stream ids belong in fedemb/privacy/streams.py: {offenders}"


def test_the_walk_finds_a_stream_id_defined_elsewhere():
    tree = ast.parse("STREAM_X = 3\nA, STREAM_Y = 1, 2\nSTREAM_Z: int = 4\ndef f():\n    STREAM_W = 5\n")
    assert {n for n in defined_names(tree) if n.startswith("STREAM_")} == {"STREAM_X", "STREAM_Y", "STREAM_Z",
                                                                            "STREAM_W"}
