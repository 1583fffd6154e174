"""Read run directories into flat records: what was run (experiment.json, or the run's own config),
what it achieved (results.json), what it spent (privacy.json, per stage), and what the synthesis steps
under RUN/synth/ measured."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedemb.config import read_toml
from fedemb.errors import FedembError
from fedemb.monitoring.metric_names import EVAL_METRICS
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.run_dir import LEDGER_FILE

METRICS = EVAL_METRICS  # what a run's results.json must hold for the report


@dataclass
class Synthesis:
    """One synthesis output (RUN/synth/<folder>/), described by what its results say was released, so that
    repeated releases of one condition (several folders, several runs) aggregate into one row."""

    kind: str  # gmm | invert | custom | dataset
    condition: str  # what was released: "ε = 2" (gmm, invert); custom: levels, DP embedding, artifacts, model
    accuracy: dict[str, float]  # method -> accuracy on real held-out data
    epsilon: float  # the release's ε (gmm, invert: its target, per method); custom: per reference image
    epsilon_total: float  # the run's ledger after this release (training + synthesis so far); custom: = epsilon
    unit: str = "user"  # custom synthesis: "reference image" (the device's own budget, not the run's ledger)
    measures: dict[str, float] = field(default_factory=dict)  # custom: what the device measured of what it shared
    folder: str = ""


@dataclass
class RunRecord:
    path: Path
    experiment: str
    group: str
    params: dict
    seed: int | None
    method: str
    initial: dict[str, float]
    final: dict[str, float]
    epsilon: float  # training, on the real population (the run's ledger before synthesis)
    delta: float
    projected_epsilon: float | None
    stages: list[tuple[str, float, float]] = field(default_factory=list)  # stage, its own ε, ledger ε after it
    synthesis: list[Synthesis] = field(default_factory=list)

    @property
    def ledger_epsilon(self) -> float:
        """The run's ledger after every stage (training and each synthesis release): what publishing all
        of the run's outputs costs."""
        return self.stages[-1][2] if self.stages else self.epsilon


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding results.json) at or under the given paths, in a stable order."""
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise FedembError(f"{path} does not exist")
        if (path / "results.json").is_file():
            found.add(path.resolve())
        found.update(p.parent.resolve() for p in path.rglob("results.json") if p.parent.name != "synth")
    if not found:
        raise FedembError(f"no run directories (with results.json) under {', '.join(map(str, paths))}")
    return sorted(found)


def load_run(path: Path) -> RunRecord:
    results = _json(path / "results.json")
    config = _toml(path / "config.toml")
    facts = _json(path / "experiment.json") if (path / "experiment.json").is_file() else {}
    method = method_of(results, config)
    privacy = results.get("privacy", {})
    try:
        final = {m: float(results["final"][m]) for m in METRICS}
        initial = {m: float(results.get("initial", {}).get(m, math.nan)) for m in METRICS}
    except (KeyError, TypeError, ValueError):
        raise FedembError(f"{path}/results.json lacks the final metrics ({', '.join(METRICS)})") from None
    stages, training_epsilon = _stages(path, privacy)
    projection = privacy.get("projection") or None
    return RunRecord(
        path=path, experiment=facts.get("experiment", config.get("run", {}).get("name", path.name)),
        group=facts.get("group", method), params=facts.get("params", {}), seed=facts.get("seed"), method=method,
        initial=initial, final=final, epsilon=training_epsilon, delta=float(privacy.get("delta", math.nan)),
        projected_epsilon=float(projection["epsilon"]) if projection else None,
        stages=stages, synthesis=_synthesis(path))


def method_of(results: dict, config: dict) -> str:
    if results.get("method") == "centralized":
        return "centralized (non-private)"
    if not results.get("privacy", {}).get("enabled", True):
        return "federated (non-private)"
    if config.get("client", {}).get("head") == "shared":
        return "DP-FedAvg (shared head)"
    return "DP-FedEmb"


def _stages(path: Path, privacy: dict) -> tuple[list[tuple[str, float, float]], float]:
    """Per stage of the ledger: its own ε and the ledger's after it; and training's ε."""
    if not (path / LEDGER_FILE).is_file():
        return [], float(privacy.get("epsilon", math.inf))
    try:
        ledger = PrivacyLedger.load(path / LEDGER_FILE)
    except (ValueError, KeyError, TypeError) as exc:
        raise FedembError(f"{path / LEDGER_FILE} is not a readable privacy ledger: {exc}") from None
    stages, seen = [], []
    for entry in ledger.entries:
        if entry.stage not in seen:
            seen.append(entry.stage)
    for stage in seen:
        own = [e for e in ledger.entries if e.stage == stage]
        upto = ledger.entries[:ledger.entries.index(own[-1]) + 1]
        stages.append((stage, ledger.epsilon_of(own), ledger.epsilon_of(upto)))
    training = next((own for stage, own, _ in stages if stage == "training"), math.inf)
    return stages, training


def _synthesis(path: Path) -> list[Synthesis]:
    out = []
    folder = path / "synth"
    files = sorted([*folder.glob("*/*_results.json"), *folder.glob("*/datasheet.json")]) if folder.is_dir() else []
    for file in files:
        reader = SYNTHESIS_READERS.get(file.name)
        if reader is not None:
            found = reader(_json(file))
            for synthesis in found if isinstance(found, list) else [found]:
                synthesis.folder = file.parent.name
                out.append(synthesis)
    return out


def _released(data: dict) -> str:
    """A DP release's condition: its target ε, and whether its noise can be predicted from a seed."""
    return f"ε = {data['released']['target_epsilon']:g}{_seeded(data['released'])}"


def _seeded(privacy: dict) -> str:
    return ", seeded noise (predictable: not a DP release)" if privacy.get("noise_predictable_from_seed") else ""


def _gmm(data: dict) -> list[Synthesis]:
    """The released mixture, and every other point of its sweep (each a release of its own)."""
    released = Synthesis("gmm", _released(data), _gmm_accuracies(data), float(data["released"]["target_epsilon"]),
                         float(data["ledger_epsilon_total"]))
    seeded = _seeded(data["released"])
    others = [Synthesis("gmm", f"ε = {p['epsilon']:g}{seeded}", _point_accuracies(data, p), float(p["epsilon"]),
                        float(data["ledger_epsilon_total"]))
              for p in data.get("sweep", []) if p["epsilon"] != data["released"]["target_epsilon"]]
    return [released, *others]


def _mixture_label(data: dict) -> str:
    s = data.get("settings", {})
    if s.get("mixture", "fixed") == "adaptive":
        return "DP-GMM (adaptive) + MLP"
    return f"DP-GMM ({s.get('clusters', '?')} clusters, {s.get('covariance', '?')}) + MLP"


def _dataset(data: dict) -> Synthesis:
    asked = data["privacy"].get("requested", {})
    within = (f"end-to-end ε within {asked['total_epsilon']:g}" if asked.get("total_epsilon") is not None
              else f"ε = {data['privacy']['stage_epsilon']:.3g}")
    seeded = _seeded(data["privacy"])
    condition = f"{data['provenance']['method']}, {data['composition']['images']} images, {within}{seeded}"
    e = data.get("evaluation") or {}
    acc = {"distilled": float(e["distilled_accuracy"]), "hard labels": float(e["hard_label_accuracy"])} if e else {}
    return Synthesis("dataset", condition, acc, float(data["privacy"]["stage_epsilon"]),
                     float(data["privacy"]["end_to_end_epsilon"]))


def _invert(data: dict) -> Synthesis:
    acc = {}
    for name, label in (("inverted", "inverted"), ("no_statistics", "no statistics")):
        if name in data["evaluation"]:
            acc[f"{label}, from scratch"] = float(data["evaluation"][name]["from_scratch_accuracy"])
            acc[f"{label}, distilled"] = float(data["evaluation"][name]["distilled_accuracy"])
    acc["private model (DP prototypes)"] = float(data["references"]["private_model_prototype_accuracy"])
    return Synthesis("invert", _released(data), acc, float(data["released"]["target_epsilon"]),
                     float(data["ledger_epsilon_total"]))


def _custom(data: dict) -> Synthesis:
    acc = {"customized": float(data["customized"]["accuracy"])}
    if "l0_baseline" in data:
        acc["L0-only baseline"] = float(data["l0_baseline"]["accuracy"])
    objects = dict(sorted(data["privacy"]["objects"].items(), key=lambda item: item[0] != "foreground"))
    shared = ", ".join(f"{obj} {o['level']}" + (f" + DP embedding ε = {o['embedding_epsilon']:g}"
                                                 if o.get("embedding_epsilon") else "") for obj, o in objects.items())
    artifacts = "with the run's released artifacts" if data.get("statistics_from") else "payload alone"
    condition = f"{shared}; {artifacts}; {data.get('settings', {}).get('model', 'head')} model"
    # L1 and L2 upload masks, edges or segments as they are: no DP guarantee for that object
    exact = any(o["level"] in ("L1", "L2") for o in objects.values())
    epsilon = math.inf if exact else float(data["privacy"]["epsilon_per_reference_image"])
    measures = {f"{obj} pixel MI / H(raw)": float(o["fraction"]) for obj, o in objects.items() if o["level"] != "L0"}
    measures |= {f"cos(synthetic, raw {obj})": float(s["synthetic_vs_own_reference"])
                 for obj, s in data["privacy"]["embedding_similarity"].items() if objects[obj]["level"] != "L0"
                 or objects[obj].get("embedding_epsilon")}
    measures["bytes uploaded"] = float(data["uploaded_bytes"])
    return Synthesis("custom", condition, acc, epsilon, epsilon, "reference image", measures)


SYNTHESIS_READERS = {"synth_results.json": _gmm, "invert_results.json": _invert, "custom_results.json": _custom,
                     "datasheet.json": _dataset}


def _gmm_accuracies(data: dict) -> dict[str, float]:
    """The released mixture's and, when they were ledger releases (a `stage` names them), its baselines'
    accuracies at synth.epsilon. Non-private figures live in the synthesis's private/ and are not read."""
    point = next((p for p in data.get("sweep", []) if p["epsilon"] == data["released"]["target_epsilon"]), {})
    return {_mixture_label(data): float(data["released"]["gmm_mlp_accuracy"])} | _baselines(point)


def _point_accuracies(data: dict, point: dict) -> dict[str, float]:
    return {_mixture_label(data): float(point["gmm_mlp"]["accuracy"])} | _baselines(point)


def _baselines(point: dict) -> dict[str, float]:
    return {label: float(point[method]["accuracy"])
            for method, label in (("dpsgd_linear_probe", "DP-SGD linear probe"), ("dp_prototypes", "DP prototypes"))
            if "stage" in point.get(method, {})}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedembError(f"cannot read {path}: {exc}") from None


def _toml(path: Path) -> dict:
    return read_toml(path, "run config") if path.is_file() else {}
