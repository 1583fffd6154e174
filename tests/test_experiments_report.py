"""Experiment specs expand into the runs they promise, the runner runs them resumably, and
`fedemb report` turns run directories into the tables and figures, averaging seeds of one grid point."""

import json
import re
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
from fedemb.report.tables import noise_tables, synthesis_tables, utility_table
from fedemb.synth.task_spec import load_task
from tests.helpers import cli

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


AFTER = 'name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\nafter = [{step}]\nafter_grid = {{ {grid} }}'


@pytest.mark.parametrize("body, message", [
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\nbogus = 1\n[[group]]\nlabel = "a"', "unknown key 'bogus'"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\nset = ["data.path={nowhere}"]\n[[group]]\nlabel = "a"', "--var nowhere="),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\n[[group]]\nlabel = "a"', "used twice"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\ngrid = { "run.rounds" = [] }', "grid.run.rounds must not be empty"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\ncommand = "train"', "command must be one of"),
    ('name = "x"\nconfig = "nope.toml"\n[[group]]\nlabel = "a"', "not found"),
    ('name = "x"\nconfig = "simulations/configs/quickstart.toml"', "group is required"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--out", "{run}/g"]', grid="e = [1]"), r"after_grid.e is named by no `after` step"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--set", "synth.epsilon={e}", "--out", "{run}/g"]', grid="e = [1]"),
     r"after\[0\] names \{e\} of after_grid, so its --out must name it too"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--set", "synth.epsilon={e}"]', grid="e = [1]"), r"its --out must name it"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--out", "{run}/g"]', grid="run = [1]"), "key 'run' must be a placeholder name"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--out", "{run}/{e}"]', grid="e = []"), "after_grid.e must not be empty"),
    (AFTER.format(step='["synth", "gmm", "{run}", "--out", "{run}/{e}"]', grid="e = [true]"), r"after_grid.e\[0\]"),
])
def test_a_bad_spec_is_refused_with_the_reason(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_spec(write_spec(tmp_path, body), {}, REPO, tmp_path)
    assert "\n" not in str(refused.value)



def test_an_after_step_runs_once_per_combination_of_the_after_grid_placeholders_it_names(tmp_path):
    spec = write_spec(tmp_path, '''
name = "sweep"
config = "simulations/configs/quickstart.toml"
seeds = [0, 1]
[[group]]
label = "a"
after = [["synth", "gmm", "{run}", "--set", "synth.epsilon={epsilon}", "--out", "{run}/synth/gmm-{epsilon}-{repeat}"],
         ["synth", "invert", "{run}", "--out", "{run}/synth/invert"],
         ["synth", "task", "digits", "--user", "{repeat}", "--out", "{experiment_dir}/task-{repeat}"]]
after_grid = { epsilon = [0.5, 2], repeat = [0, 1, 2] }
''')
    cells = load_spec(spec, {}, REPO, tmp_path / "runs").cells
    assert len(cells) == 2  # the after grid adds steps, not runs
    after = cells[0].after
    assert len(after) == 2 * 3 + 1 + 3 and after == cells[1].after
    assert after[0] == ["synth", "gmm", "{run}", "--set", "synth.epsilon=0.5", "--out", "{run}/synth/gmm-0.5-0"]
    assert after[5][-1] == "{run}/synth/gmm-2-2" and after[6] == ["synth", "invert", "{run}", "--out", "{run}/synth/invert"]
    assert after[-1] == ["synth", "task", "digits", "--user", "2", "--out", str(tmp_path / "runs" / "sweep" / "task-2")]
    assert len({tuple(step) for step in after}) == len(after)


SHIPPED_VARS = {"data": "/data", "qmnist": "/qmnist"}


@pytest.mark.parametrize("name, runs, steps", [
    ("synth-sweep-digits", 1, 5 * 3 + 3 * 2),  # DP-GMM (with its baselines) at 5 ε × 3, inversion at 3 ε × 2
    ("synth-sweep-mnist", 1, 5 * 3 + 3 * 2),
    ("synth-sweep-fashion", 1, 3),
    ("noise-ablation", 4 * 2 * 3, 0),  # 4 variants × (DP, noise off) × 3 seeds
    ("custom-mnist", 1, 1 + 8 * 2 * (3 + 6)),  # one inversion; per writer and model 3 tasks and 6 syntheses
])
def test_the_sweep_specs_expand_to_the_runs_and_releases_their_pages_report(tmp_path, name, runs, steps):
    cells = load_spec(REPO / "scripts" / "experiments" / f"{name}.toml", SHIPPED_VARS, REPO, tmp_path).cells
    assert len(cells) == runs and all(len(c.after) == steps for c in cells)
    for cell in cells:
        outs = [step[step.index("--out") + 1] for step in cell.after]
        assert len(set(outs)) == len(outs)  # every release its own output: a resumed sweep skips only what is done
        for step in cell.after:
            assert not any("seed=" in arg for arg in step)  # fresh OS noise: a published seed would predict it
    if name == "noise-ablation":
        arms = {(c.group, c.params["privacy.noise_multiplier"] == 0.0) for c in cells}
        assert len(arms) == 8 and {c.seed for c in cells} == {0, 1, 2}
    if name == "synth-sweep-digits":
        gmm = [s for s in cells[0].after if s[1] == "gmm"]
        assert sorted({s[4] for s in gmm}) == [f"synth.epsilon={e}" for e in ("0.5", "1", "2", "4", "8")]


def record(group, params, seed, recall, epsilon, method="DP-FedEmb", projected=None, synth=()):
    return RunRecord(Path(f"/r/{group}/{seed}"), "exp", group, params, seed, method,
                     {m: 0.5 for m in ("recall_at_1", "tar_at_far_1e-3", "tar_at_far_1e-1")},
                     {"recall_at_1": recall, "tar_at_far_1e-3": recall / 2, "tar_at_far_1e-1": recall / 1.5},
                     epsilon, 1e-5, projected, [], list(synth))


def test_seeds_of_a_grid_point_are_averaged_and_compared_with_the_non_private_run():
    records = [record("DP-FedEmb", {"privacy.target_epsilon": 4.0}, s, r, 4.0,
                      synth=[Synthesis("gmm", "ε = 2", {"DP-GMM + MLP": r / 2}, 2.0, 6.0)]) for s, r in ((0, 0.80), (1, 0.90))]
    records.append(record("federated (non-private)", {}, 0, 1.0, math.inf, method="federated (non-private)"))
    points = aggregate(records)
    dp = next(p for p in points if p.group == "DP-FedEmb")
    assert dp.seeds == 2 and dp.metrics["recall_at_1"].mean == pytest.approx(0.85)
    assert dp.metrics["recall_at_1"].std == pytest.approx(0.0707107, rel=1e-5)  # sample std over seeds
    synth = dp.synthesis[("gmm", "ε = 2", "DP-GMM + MLP")]
    assert synth.accuracy.mean == pytest.approx(0.425) and synth.epsilon_total.mean == 6.0 and synth.unit == "user"
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
after = [["synth", "gmm", "{run}", "--no-baselines", "--set", "synth.mlp_epochs=5", "--set", "synth.epsilon={epsilon}",
          "--out", "{run}/synth/gmm-{epsilon}"]]
after_grid = { epsilon = [1, 2] }  # two releases on the one trained run
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
    assert "centralized (non-private)" in report and "synthesis/gmm 2" in report
    assert re.search(r"DP-GMM \((adaptive|\d+ clusters, \w+)\) \+ MLP", report)
    stages = {e["stage"] for e in json.loads((cell / "privacy.json").read_text())["entries"]}
    assert stages == {"training", "synthesis/gmm 1", "synthesis/gmm 2"}  # each point a release of its own
    assert "| DP-FedEmb | target_epsilon=2.0 | ε = 1 | 1 |" in report and "| DP-FedEmb | target_epsilon=2.0 | ε = 2 | 1 |" in report
    for figure in ("tiny-epsilon.png", "tiny-synthesis.png", "tiny-ledger.png"):
        assert (out / figure).stat().st_size > 10_000
    points = json.loads((out / "points.json").read_text())["points"]
    dp = [p for p in points if p["group"] == "DP-FedEmb"]
    assert [p["params"]["privacy.target_epsilon"] for p in dp] == [2.0]
    assert all(p["epsilon"] <= p["params"]["privacy.target_epsilon"] * 1.001 for p in dp)  # training stays within the target


def test_seeds_given_to_the_runner_replace_the_specs_own_so_a_finished_sweep_can_gain_seeds(tmp_path):
    spec = write_spec(tmp_path, '''
name = "seeded"
config = "simulations/configs/quickstart.toml"
seeds = [0]
[[group]]
label = "a"
[[group]]
label = "b"
seeds = [0, 1, 2]
''')
    own = load_spec(spec, {}, REPO, tmp_path).cells
    assert sorted((c.group, c.seed) for c in own) == [("a", 0), ("b", 0), ("b", 1), ("b", 2)]
    added = load_spec(spec, {}, REPO, tmp_path, seeds=[1, 3]).cells
    assert sorted((c.group, c.seed) for c in added) == [("a", 1), ("a", 3), ("b", 1), ("b", 3)]
    assert {c.run_dir.name for c in added} == {"seed-1", "seed-3"} and all("run.seed=1" in c.overrides or "run.seed=3" in c.overrides for c in added)


@pytest.mark.parametrize("spec", sorted((REPO / "scripts" / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_spec_expands_into_valid_configs(spec, tmp_path):
    """A typo in a shipped spec (a key, a value out of range) fails here, not an hour into a sweep."""
    cells = load_spec(spec, {"data": "/data", "qmnist": "/qmnist", "task": "/task.toml"}, REPO, tmp_path).cells
    assert cells
    for cell in cells:
        load_config(cell.config, cell.overrides)


def test_repeated_releases_of_one_condition_are_one_row_and_the_ledger_after_all_of_them_is_stated():
    """A sweep on one trained run: every (ε, repeat) is its own release; the report averages the repeats of
    each ε per classifier and states what publishing all of them costs (the ledger after the last)."""
    releases = [Synthesis("gmm", f"ε = {e:g}", {"DP-GMM + MLP": acc, "DP prototypes": 0.8}, e, 6.0 + i)
                for i, (e, acc) in enumerate([(0.5, 0.70), (0.5, 0.74), (8.0, 0.90), (8.0, 0.92)])]
    run = record("DP-FedEmb", {}, 0, 0.9, 6.0, synth=releases)
    run.stages = [("training", 6.0, 6.0), ("synthesis/gmm 1", 0.5, 6.5), ("synthesis/gmm 4", 8.0, 12.5)]
    (title, table), = synthesis_tables(aggregate([run]))
    assert "synth gmm" in title
    rows = [line for line in table.splitlines() if line.startswith("| DP-FedEmb")]
    assert [row.split(" | ")[2] for row in rows] == ["ε = 0.5", "ε = 8"]  # in order of ε
    assert "| 2 | 12.5 (training 6; δ = 1e-05) | 0.720 ± 0.028 | 0.800 ± 0.000 |" in rows[0]
    assert "0.910 ± 0.014" in rows[1]


def test_a_group_trained_with_and_without_noise_is_compared_seed_by_seed():
    runs = []
    for seed, dp, off in ((0, 0.80, 0.90), (1, 0.84, 0.88)):
        runs.append(record("k=4", {"privacy.noise_multiplier": 1.6}, seed, dp, 6.3))
        runs.append(record("k=4", {"privacy.noise_multiplier": 0.0}, seed, off, math.inf))
    runs.append(record("other", {}, 0, 0.7, 6.3))  # no noise-off run: not compared
    table = noise_tables(aggregate(runs))
    assert "| k=4 | untrained | – | 0.500 ± 0.000 |" in table
    assert "| k=4 | DP (noise_multiplier=1.6) | 6.3 | 0.820 ± 0.028 |" in table
    assert "| k=4 | noise off (noise_multiplier=0.0) | ∞ | 0.890 ± 0.014 |" in table
    assert f"| k=4 | DP (noise_multiplier=1.6) ÷ noise off |  | {0.82 / 0.89:.2f} |" in table
    assert "| k=4 | noise_multiplier=1.6 | 0 | +0.300 / +0.100 |" in table  # DP − untrained / noise off − DP
    assert "| k=4 | noise_multiplier=1.6 | 1 | +0.340 / +0.040 |" in table
    assert "other" not in table
    assert noise_tables(aggregate(runs[-1:])) == ""


CUSTOM_RESULTS = {
    "customized": {"accuracy": 0.6}, "l0_baseline": {"accuracy": 0.1}, "uploaded_bytes": 6000,
    "levels": {"foreground": "L1", "background": "L0"}, "statistics_from": None, "settings": {"model": "scratch"},
    "privacy": {"epsilon_per_reference_image": 0.0,
                "objects": {"foreground": {"level": "L1", "fraction": 0.26, "embedding_epsilon": 0.0},
                            "background": {"level": "L0", "fraction": 0.0, "embedding_epsilon": 0.0}},
                "embedding_similarity": {"foreground": {"synthetic_vs_own_reference": 0.8},
                                         "background": {"synthetic_vs_own_reference": 0.1}}}}


def test_a_customized_synthesis_is_reported_by_what_the_user_shared_on_the_devices_own_budget(tmp_path):
    from fedemb.report.collect import _synthesis

    for folder, dp in (("custom-a", 0.0), ("custom-b", 4.0)):
        results = json.loads(json.dumps(CUSTOM_RESULTS))
        if dp:  # nothing but a DP embedding of the foreground leaves the device
            results["privacy"]["objects"]["foreground"] |= {"level": "L0", "embedding_epsilon": dp}
            results["privacy"]["epsilon_per_reference_image"] = dp
        (tmp_path / "synth" / folder).mkdir(parents=True)
        (tmp_path / "synth" / folder / "custom_results.json").write_text(json.dumps(results))
    exact, private = _synthesis(tmp_path)
    assert exact.condition == "foreground L1, background L0; payload alone; scratch model"
    assert exact.epsilon == math.inf and exact.unit == "reference image"  # edges uploaded as they are: no DP claim
    assert exact.accuracy == {"customized": 0.6, "L0-only baseline": 0.1}
    assert exact.measures == {"foreground pixel MI / H(raw)": 0.26, "cos(synthetic, raw foreground)": 0.8,
                              "bytes uploaded": 6000.0}
    assert private.condition.startswith("foreground L0 + DP embedding ε = 4, background L0;") and private.epsilon == 4.0


def test_synth_task_writes_a_digits_users_task_that_synth_custom_reads(tmp_path):
    code, output = cli("synth", "task", "digits", "--user", "2", "--references", "2", "--foreground", "L2",
                       "--foreground-epsilon", "4", "--model", "scratch", "--out", tmp_path / "task")
    assert code == 0, output
    task = load_task(tmp_path / "task" / "task.toml", (1, 8, 8))
    assert task.name == "digits-sample-2" and task.seed == -1  # OS noise for the DP embeddings unless asked
    assert len(task.references) == 2 * 10 and len(task.test_labels) == 8 * 10
    assert task.policy["foreground"].level == "L2" and task.policy["foreground"].embedding_epsilon == 4.0
    assert task.synthesis == {"model": "scratch"}
    code, output = cli("synth", "task", "mnist", "--out", tmp_path / "mnist")
    assert code != 0 and "--test-writers" in output and not (tmp_path / "mnist").exists()
    code, output = cli("synth", "task", "digits", "--threshold", "1.5", "--out", tmp_path / "bad")
    assert code != 0 and "threshold:1.5" in output and not (tmp_path / "bad").exists()


def test_a_step_killed_part_way_runs_again_and_its_unfinished_output_is_kept_aside(tmp_path):
    import io

    from fedemb.experiment_runner import step_done

    log = io.StringIO()
    finished, killed, pretrained = tmp_path / "gmm-a", tmp_path / "gmm-b", tmp_path / "p.pt"
    finished.mkdir()
    (finished / "synth_results.json").write_text("{}")
    killed.mkdir()
    (killed / "gmm.npz").write_text("partial")
    pretrained.write_text("weights")
    dataset = tmp_path / "dataset"  # `synth dataset`: its datasheet marks it finished (a re-run would release again)
    (dataset / "images").mkdir(parents=True)
    (dataset / "datasheet.json").write_text("{}")
    assert step_done(finished, log) and step_done(pretrained, log) and step_done(dataset, log)
    assert not step_done(None, log) and not step_done(tmp_path / "never-run", log)
    assert not step_done(killed, log) and not killed.exists()
    assert (tmp_path / "gmm-b.unfinished-1" / "gmm.npz").read_text() == "partial" and "left unfinished" in log.getvalue()
