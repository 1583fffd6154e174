"""Plays a user who opens TensorBoard on a finished run in a real browser (headless Chromium from
Debian's `chromium` package, driven by scripts/tensorboard_browser.py): every view a run publishes has
content, and the curves people watch come first."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VIEWS = ["timeseries", "hparams", "text", "images", "projector"]


def needs_chromium():
    from scripts.tensorboard_browser import find_chromium

    if find_chromium() is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium)")


@pytest.mark.integration
def test_tensorboard_in_a_browser_shows_curves_hparams_text_images_and_the_projector(tmp_path):
    needs_chromium()
    from scripts.tensorboard_browser import capture, tensorboard_server

    run_dir = tmp_path / "run"
    done = subprocess.run([str(Path(sys.executable).with_name("fedemb")), "simulate", "--config",
                           str(REPO / "simulations/configs/quickstart.toml"), "--run-dir", str(run_dir),
                           "--set", 'simulation.engine="inprocess"', "--set", "run.rounds=3", "--set", "run.eval_every=2",
                           "--set", "data.num_users=300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with tensorboard_server(run_dir / "tensorboard") as url:
        facts = capture(url, VIEWS, tmp_path / "shots")
    for view in VIEWS:
        assert facts[view]["rendered"], f"{view}: {facts[view].get('empty') or facts[view]['text'][:300]}"
        assert (tmp_path / "shots" / f"tensorboard-{view}.png").stat().st_size > 20_000, view

    curves = facts["timeseries"]["text"]
    assert curves.index("1_training") < curves.index("2_evaluation") < curves.index("3_privacy")
    assert facts["timeseries"]["line_charts"] >= 3
    assert "privacy.delta" in facts["hparams"]["text"] and "2_evaluation/recall_at_1" in facts["hparams"]["text"]
    text = facts["text"]["text"]
    assert "run/config" in text and "[privacy]" in text and "privacy.unit" in text and "run/summary" in text
    assert facts["images"]["images"] >= 1 and "held_out_inputs_one_class_per_row" in facts["images"]["text"]
    projector = facts["projector"]["text"]
    assert re.search(r"Metadata:\s*00003/", projector), projector  # it opens on the latest evaluation
    assert facts["projector"]["canvases"] >= 1
