"""Experiment specs expand into the runs they promise, the runner runs them resumably, and
`fedemb report` turns run directories into the tables and figures, averaging seeds of one grid point."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedemb.config import load_config
from fedemb.errors import ConfigError
from fedemb.experiments import load_spec
from fedemb.report.aggregate import Stat, aggregate
from fedemb.report.collect import RunRecord, Synthesis
from fedemb.report.tables import utility_table

REPO = Path(__file__).resolve().parents[1]


def write_spec(tmp_path, text):
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    return spec


def test_a_spec_expands_to_every_grid_point_and_seed_with_its_overrides(tmp_path):
    spec = write_spec(tmp_path, '''
name = "demo"
config = "simulations/configs/quickstart.toml"
set = ["data.path={data}/x"]
seeds = [0, 1]
[[group]]
label = "DP-FedEmb"
grid = { "privacy.target_epsilon" = [1.0, 4.0], "sampling.users_per_client" = [1, 4] }
after = [["synth", "gmm", "{run}", "--out", "{run}/synth/gmm"]]
[[group]]
label = "centralized"
command = "centralized"
seeds = [0]
before = [["pretrain", "--out", "{experiment_dir}/p.pt"]]
grid = { "model.init_checkpoint" = ["", "{experiment_dir}/p.pt"] }
''')
    cells = load_spec(spec, {"data": "/d"}, REPO, tmp_path / "runs").cells
    assert len(cells) == 2 * 2 * 2 + 2
    first = cells[0]
    assert first.overrides == ["data.path=/d/x", "privacy.target_epsilon=1.0", "sampling.users_per_client=1", "run.seed=0"]
    assert first.run_dir == tmp_path / "runs" / "demo" / "dp-fedemb" / "target_epsilon=1.0,users_per_client=1" / "seed-0"
    assert first.after == [["synth", "gmm", "{run}", "--out", "{run}/synth/gmm"]]
    central = cells[-1]
    assert central.command == "centralized" and central.seed == 0
    assert central.params == {"model.init_checkpoint": str(tmp_path / "runs" / "demo" / "p.pt")}  # filled in grids too
    assert central.run_dir.parent.name == "init_checkpoint=p.pt" and cells[-2].run_dir.parent.name == "init_checkpoint=none"
    assert central.before == [["pretrain", "--out", str(tmp_path / "runs" / "demo" / "p.pt")]]
    assert len({c.run_dir for c in cells}) == len(cells)


@pytest.mark.parametrize("body, message", [
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\nbogus = 1\n[[group]]\nlabel = "a"', "unknown key 'bogus'"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\nset = ["data.path={nowhere}"]\n[[group]]\nlabel = "a"', "--var nowhere="),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\n[[group]]\nlabel = "a"', "used twice"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\ngrid = { "run.rounds" = [] }', "grid.run.rounds must not be empty"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\ncommand = "train"', "command must be one of"),
    ('name = "x"\nconfig = "nope.toml"\n[[group]]\nlabel = "a"', "not found"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"', "group is required"),
])
def test_a_bad_spec_is_refused_with_the_reason(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, body), {}, REPO, tmp_path)


def record(group, params, seed, recall, epsilon, method="DP-FedEmb", projected=None, synth=()):
    return RunRecord(Path(f"/r/{group}/{seed}"), "exp", group, params, seed, method,
                     {m: 0.5 for m in ("recall_at_1", "tar_at_far_1e-3", "tar_at_far_1e-1")},
                     {"recall_at_1": recall, "tar_at_far_1e-3": recall / 2, "tar_at_far_1e-1": recall / 1.5},
                     epsilon, 1e-5, projected, [], list(synth))


def test_seeds_of_a_grid_point_are_averaged_and_compared_with_the_non_private_run():
    records = [record("DP-FedEmb", {"privacy.target_epsilon": 4.0}, s, r, 4.0,
                      synth=[Synthesis("gmm", "gmm", {"DP-GMM + MLP": r / 2}, 6.0)]) for s, r in ((0, 0.80), (1, 0.90))]
    records.append(record("federated (non-private)", {}, 0, 1.0, math.inf, method="federated (non-private)"))
    points = aggregate(records)
    dp = next(p for p in points if p.group == "DP-FedEmb")
    assert dp.seeds == 2 and dp.metrics["recall_at_1"].mean == pytest.approx(0.85)
    assert dp.metrics["recall_at_1"].std == pytest.approx(0.0707107, rel=1e-5)  # sample std over seeds
    acc, eps, unit = dp.synthesis[("gmm", "gmm", "DP-GMM + MLP")]
    assert acc.mean == pytest.approx(0.425) and eps.mean == 6.0 and unit == "user"
    table = utility_table(points)
    assert "0.850 ± 0.071" in table and "-15.0%" in table and "| ∞ |" in table
    assert Stat.of([1.0, math.inf]).text() == "∞"


@pytest.mark.integration
def test_the_runner_runs_a_spec_resumably_and_the_report_shows_it(tmp_path):
    spec = write_spec(tmp_path, '''
name = "tiny"
config = "simulations/configs/quickstart.toml"
set = ["run.rounds=2", "run.eval_every=0", "run.checkpoint_every=0", "data.num_users=200", 'simulation.engine="inprocess"']
seeds = [0]
[[group]]
label = "centralized (non-private)"
command = "centralized"
set = ["pretrain.epochs=1"]
[[group]]
label = "DP-FedEmb"
grid = { "privacy.target_epsilon" = [2.0] }  # one run: the grid's expansion is tested without running
after = [["synth", "gmm", "{run}", "--no-baselines", "--set", "synth.seed=0", "--set", "synth.mlp_epochs=5", "--out", "{run}/synth/gmm"]]
''')
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "fedemb", "experiments", "run", str(spec), "--runs", str(runs)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + (runs / "experiments.log").read_text()[-3000:]
    cells = sorted(p.parent for p in runs.rglob("experiment.json"))
    assert len(cells) == 2 and all((c / "results.json").is_file() for c in cells)
    cell = runs / "tiny" / "dp-fedemb" / "target_epsilon=2.0" / "seed-0"
    facts = json.loads((cell / "experiment.json").read_text())
    assert facts["group"] == "DP-FedEmb" and facts["params"] == {"privacy.target_epsilon": 2.0}
    assert "wall_seconds" not in facts  # run times are server-private
    assert json.loads((cell / "private" / "experiment-timing.json").read_text())["wall_seconds"] > 0

    logged = (runs / "experiments.log").read_text()
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": 0 s") == 2
    assert "$ " not in (runs / "experiments.log").read_text()[len(logged):]  # all done: nothing ran again

    out = tmp_path / "report"
    shown = subprocess.run([sys.executable, "-m", "fedemb", "report", str(runs), "--out", str(out)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    report = (out / "report.md").read_text()
    assert "## tiny" in report and "| DP-FedEmb | target_epsilon=2.0 | 1 | " in report
    assert "centralized (non-private)" in report and "DP-GMM + MLP" in report and "synthesis/gmm 1" in report
    for figure in ("tiny-epsilon.png", "tiny-synthesis.png", "tiny-ledger.png"):
        assert (out / figure).stat().st_size > 10_000
    points = json.loads((out / "points.json").read_text())["points"]
    dp = [p for p in points if p["group"] == "DP-FedEmb"]
    assert [p["params"]["privacy.target_epsilon"] for p in dp] == [2.0]
    assert all(p["epsilon"] <= p["params"]["privacy.target_epsilon"] * 1.001 for p in dp)  # training stays within the target


@pytest.mark.parametrize("spec", sorted((REPO / "scripts" / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_spec_expands_into_valid_configs(spec, tmp_path):
    """A typo in a shipped spec (a key, a value out of range) fails here, not an hour into a sweep."""
    cells = load_spec(spec, {"data": "/data", "qmnist": "/qmnist", "task": "/task.toml"}, REPO, tmp_path).cells
    assert cells
    for cell in cells:
        load_config(cell.config, cell.overrides)
