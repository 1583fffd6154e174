"""Every array layout and dtype people keep images in trains through the real CLI: `fedemb simulate` on
an .npz or an npy directory, 2 rounds in process (simulation.engine = "inprocess", no Ray), with the
images resized or converted to the channels the config states."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedemb.cli import app

pytestmark = pytest.mark.slow  # about 10 s of imports on the first run, then about half a second a run

QUICKSTART = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "quickstart.toml"
IMAGES, SIDE, USERS, CLASSES = 60, 12, 12, 3
SHAPES = {  # layout: shape of the generated x
    "NHW": (IMAGES, SIDE, SIDE), "NHW1": (IMAGES, SIDE, SIDE, 1), "NHW3": (IMAGES, SIDE, SIDE, 3),
    "N1HW": (IMAGES, 1, SIDE, SIDE), "N3HW": (IMAGES, 3, SIDE, SIDE), "NHW4": (IMAGES, SIDE, SIDE, 4),
}

# (source, layout, dtype, extra settings, the (C, H, W) the model trains on): every layout, every dtype
# and both sources at least once, not their product
CASES = [
    ("npz", "NHW", "uint8", [], (1, 12, 12)),
    ("npy", "NHW1", "float32", [], (1, 12, 12)),
    ("npz", "NHW3", "float64", [], (3, 12, 12)),
    ("npy", "N1HW", "uint8", [], (1, 12, 12)),
    ("npz", "N3HW", "float32", [], (3, 12, 12)),
    ("npy", "NHW4", "float64", [], (4, 12, 12)),
    ("npy", "NHW3", "uint8", [], (3, 12, 12)),
    ("npz", "NHW4", "uint8", ["data.channels=3"], (3, 12, 12)),
    ("npz", "NHW", "uint8", ['data.image_size="16x16"'], (1, 16, 16)),
    ("npy", "NHW", "float32", ["data.channels=3"], (3, 12, 12)),
    ("npy", "N3HW", "float64", ['data.image_size="8x10"', "data.channels=1"], (1, 8, 10)),
]


def generated_images(layout: str, dtype: str) -> np.ndarray:
    """Images whose brightness tells their class apart a little, in the given layout and dtype."""
    shape = SHAPES[layout]
    brightness = (np.arange(IMAGES) % CLASSES) * 0.25
    values = np.random.default_rng(0).random(shape) * 0.5 + brightness.reshape(-1, *[1] * (len(shape) - 1))
    return (values * 255).round().astype(np.uint8) if dtype == "uint8" else values.astype(dtype)


def write_source(folder: Path, source: str, x: np.ndarray) -> Path:
    y, users = np.arange(IMAGES) % CLASSES, np.arange(IMAGES) % USERS
    if source == "npz":
        np.savez(folder / "data.npz", x=x, y=y, user=users)
        return folder / "data.npz"
    path = folder / "arrays"
    path.mkdir()
    for name, array in (("x", x), ("y", y), ("user", users)):
        np.save(path / f"{name}.npy", array)
    return path


def simulate(run_dir: Path, *settings: str):
    args = ["simulate", "--config", str(QUICKSTART), "--run-dir", str(run_dir)]
    for setting in ('simulation.engine="inprocess"', "run.rounds=2", "run.eval_every=0", "data.eval_users=0.25",
                    *settings):
        args += ["--set", setting]
    return CliRunner().invoke(app, args)


def trained_image_shape(cache: Path, source: str) -> tuple[int, ...]:
    """The (C, H, W) of the store the run trained from (the only store in its cache)."""
    (store,) = [p for p in cache.glob(f"{source}-*") if p.is_dir()]
    return tuple(np.load(store / "train" / "images.npy", mmap_mode="r").shape[1:])


def case_id(case) -> str:
    source, layout, dtype, settings, _ = case
    return "-".join([source, layout, dtype, *(s.removeprefix("data.").replace('"', "") for s in settings)])


@pytest.mark.parametrize("source, layout, dtype, settings, model_shape", CASES, ids=[case_id(c) for c in CASES])
def test_each_array_layout_and_dtype_trains_two_rounds_through_the_cli(tmp_path, source, layout, dtype, settings,
                                                                       model_shape):
    x = generated_images(layout, dtype)
    path, cache, run_dir = write_source(tmp_path, source, x), tmp_path / "cache", tmp_path / "run"
    result = simulate(run_dir, f'data.name="{source}"', f'data.path="{path}"', f'data.cache_dir="{cache}"',
                      *settings)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "results.json").read_text())["rounds_completed"] == 2
    assert trained_image_shape(cache, source) == model_shape
