"""Customized synthesis on the server: it works from the payload alone (an L0 object cannot change the
synthetic images), puts shared segments back exactly, matches shared edges with the client's own edge
filter, lets a noisy DP embedding steer only as much as its noise allows, and the CLI runs end to end
with one-line errors, uploading nothing, on bad tasks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedemb.errors import ConfigError
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.custom import (CustomSettings, class_anchors, copy_targets, custom_settings, release_reliability,
                                 sobel_magnitude, synthesize)
from fedemb.synth.custom_run import nothing_shared
from fedemb.synth.sanitize import edge_maps, payload_from_bytes, payload_to_bytes, sanitize
from fedemb.synth.task_spec import OBJECTS, CustomTask, ObjectPolicy
from tests.helpers import cli

SHAPE = (1, 12, 12)
FAST = CustomSettings(images_per_reference=2, steps=30, shift=0, train_epochs=1)


def tiny_encoder(dim=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, dim))


def task(levels, epsilons=None, n=4, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    masks = np.stack([(yy - 6 - i % 2) ** 2 + (xx - 6) ** 2 < 12 for i in range(n)])
    images = rng.random((n, *SHAPE), dtype=np.float32)
    return CustomTask(name="t", path=Path("task.toml"), class_names=["a", "b"], prototypes=[0, 1],
                      references=images, reference_labels=np.arange(n) % 2, masks=masks,
                      policy={o: ObjectPolicy(levels[o], (epsilons or {}).get(o, 0.0)) for o in OBJECTS},
                      test_images=images[:2], test_labels=np.array([0, 1]), delta=1e-5, seed=0, synthesis={})


def encode_fn(net):
    return lambda x: net(torch.as_tensor(x) * 2 - 1).detach().numpy()


def received(t, net, seed=0):
    stage = LedgerStage(PrivacyLedger(None, t.delta, unit="reference image"), "customized synthesis/embeddings",
                        NoiseSource(seed))
    return payload_from_bytes(payload_to_bytes(sanitize(t, encode_fn(net), stage)))


def test_the_servers_edge_filter_is_the_clients():
    images = np.random.default_rng(1).random((3, 2, 12, 12), dtype=np.float32)
    everywhere = np.ones((3, 12, 12), dtype=bool)
    server = sobel_magnitude(torch.as_tensor(images)).numpy()
    assert np.allclose(server, edge_maps(images, everywhere), atol=1e-5)


@pytest.mark.parametrize("l0_object", OBJECTS)
def test_synthetic_images_do_not_depend_on_an_l0_objects_pixels(l0_object):
    """The server sees bytes only: scrambling the L0 object on the device changes nothing it makes."""
    other = "background" if l0_object == "foreground" else "foreground"
    net = tiny_encoder()
    base = task({l0_object: "L0", other: "L1"}, {other: 2.0})
    scrambled = task({l0_object: "L0", other: "L1"}, {other: 2.0})
    region = base.masks if l0_object == "foreground" else ~base.masks
    scrambled.references = np.where(region[:, None], 1 - base.references, base.references)
    a, _, _ = synthesize(net, received(base, net), FAST, seed=4, population_prototypes=np.eye(6)[:2])
    b, _, _ = synthesize(net, received(scrambled, net), FAST, seed=4, population_prototypes=np.eye(6)[:2])
    assert np.array_equal(a, b)
    # the shared object does matter
    changed = task({l0_object: "L0", other: "L1"}, {other: 2.0})
    changed.references = np.where(region[:, None], base.references, 1 - base.references)
    c, _, _ = synthesize(net, received(changed, net), FAST, seed=4, population_prototypes=np.eye(6)[:2])
    assert not np.array_equal(a, c)


def test_shared_segments_are_kept_exactly_in_every_copy():
    net = tiny_encoder()
    t = task({"foreground": "L2", "background": "L0"})
    payload = received(t, net)
    images, targets, _ = synthesize(net, payload, FAST, seed=0)
    mask = t.masks[targets.reference][:, None]
    assert np.allclose(images[np.broadcast_to(mask, images.shape)],
                       t.references[targets.reference][np.broadcast_to(mask, images.shape)], atol=1e-6)
    assert not np.allclose(images[~np.broadcast_to(mask, images.shape)], 0)  # the rest was synthesized


def test_shared_edges_are_matched():
    net = tiny_encoder()
    t = task({"foreground": "L1", "background": "L0"})
    payload = received(t, net)
    settings = CustomSettings(images_per_reference=2, steps=200, shift=0, weight_class=0, jitter=0)
    start, targets, _ = synthesize(net, payload, CustomSettings(images_per_reference=2, steps=0, shift=0), seed=0)
    images, _, _ = synthesize(net, payload, settings, seed=0)
    mask = payload.masks["foreground"][targets.reference]
    target = payload.edges["foreground"][targets.reference]

    def error(x):
        return float((((sobel_magnitude(torch.as_tensor(x * mask[:, None])).numpy() - target) * mask) ** 2).mean())
    assert error(images) < 0.2 * error(start)


def test_copies_of_a_reference_are_shifted_with_zero_fill():
    t = task({"foreground": "L2", "background": "L0"})
    payload = received(t, tiny_encoder())
    targets = copy_targets(payload, 5, 2, np.random.default_rng(0))
    assert len(targets.labels) == 20 and (targets.reference == np.repeat(np.arange(4), 5)).all()
    kept = targets.masks["foreground"].sum((1, 2))
    assert (kept <= payload.masks["foreground"][targets.reference].sum((1, 2))).all()
    assert len({targets.masks["foreground"][i].tobytes() for i in range(5)}) > 1


def test_a_noisy_embedding_steers_in_proportion_to_its_signal():
    assert release_reliability(32, 0.0) == 1.0
    assert release_reliability(32, 2.4) < 0.01 < release_reliability(32, 0.05)
    payload = received(task({"foreground": "L0", "background": "L0"}, {"foreground": 1.0}), tiny_encoder())
    prototypes = np.eye(6)[:2]
    assert np.allclose(class_anchors(payload, prototypes), prototypes)  # a DP prototype beats one noisy image
    unmapped = payload.__class__(**{**payload.__dict__, "prototypes": [-1, -1]})
    anchors = class_anchors(unmapped, prototypes)
    assert anchors.shape == (2, 6) and np.allclose(np.linalg.norm(anchors, axis=1), 1)
    assert class_anchors(nothing_shared(unmapped), prototypes) is None


def test_the_l0_baseline_uploads_nothing_about_the_images():
    payload = nothing_shared(received(task({"foreground": "L2", "background": "L1"}, {"foreground": 1.0}),
                                      tiny_encoder()))
    assert not (payload.masks or payload.edges or payload.segments or payload.embeddings)


@pytest.mark.parametrize("raw,needle", [
    ({"stepz": 3}, "unknown key 'synthesis.stepz'"),
    ({"steps": 2.5}, "synthesis.steps must be an integer"),
    ({"lr": 0}, "synthesis.lr must be > 0"),
    ({"model": "big"}, "synthesis.model must be one of head, scratch"),
])
def test_bad_synthesis_settings_are_one_line_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        custom_settings(raw, "task.toml")


# ---------------------------------------------------------------- the CLI, on a small trained run
# (trained_run: tests/conftest.py)

def digits_task(folder: Path, levels='foreground = "L1"\nbackground = "L0"', extra="", shape=(8, 8),
                mask_rule="threshold:0.3") -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.concatenate([np.flatnonzero(d.target == c)[:4] for c in range(3)])
    images = (d.images[rows] * 255 / 16).astype(np.uint8)
    if shape != (8, 8):
        images = np.zeros((len(rows), *shape), np.uint8)
    labels = d.target[rows]
    refs = np.r_[0, 4, 8]
    np.savez(folder / "refs.npz", images=images[refs], labels=labels[refs])
    test = np.setdiff1d(np.arange(len(rows)), refs)
    np.savez(folder / "test.npz", images=images[test], labels=labels[test])
    classes = "".join(f'\n[[classes]]\nname = "{c}"\nprototype = {c}\n' for c in range(3))
    (folder / "task.toml").write_text(f'name = "t"\nreferences = "refs.npz"\nmask_rule = "{mask_rule}"\nseed = 0\n'
                                      f"\n[levels]\n{levels}\n{classes}\n[test]\nimages = \"test.npz\"\n"
                                      f"\n[synthesis]\nimages_per_reference = 2\nsteps = 5\ntrain_epochs = 2\n{extra}")
    return folder / "task.toml"


def test_custom_on_a_run_writes_the_payload_the_images_and_the_report(trained_run, tmp_path):
    inverted = trained_run / "inv"
    code, output = cli("synth", "invert", trained_run, "--set", "invert.seed=0", "--set", "invert.steps=3",
                       "--set", "invert.images_per_class=1", "--set", "invert.train_epochs=1", "--set",
                       "invert.ablation=false", "--out", inverted)
    assert code == 0, output
    epsilon_before = json.loads((trained_run / "privacy.json").read_text())["epsilon"]
    out = tmp_path / "custom"
    task_file = digits_task(tmp_path / "task", 'foreground = "L1"\nbackground = "L0"\n\n[embedding_epsilon]\n'
                                               "foreground = 3.0")
    code, output = cli("synth", "custom", trained_run, "--task", task_file, "--statistics", inverted, "--out", out,
                       "--json")
    assert code == 0, output
    results = json.loads(output.strip().splitlines()[-1])
    for name in ("payload.bin", "synthetic.npz", "l0_baseline.npz", "custom_results.json", "synthetic.png",
                 "l0_baseline.png", "shared_edges_foreground.png", "privacy.json"):
        assert (out / name).is_file(), name
    assert (out / "payload.bin").stat().st_size == results["uploaded_bytes"]
    with np.load(out / "synthetic.npz") as f:
        assert f["images"].shape == (3 * 2, 1, 8, 8)
    assert 0 <= results["customized"]["accuracy"] <= 1 and 0 <= results["l0_baseline"]["accuracy"] <= 1
    assert results["privacy"]["epsilon_per_reference_image"] == pytest.approx(3.0, rel=0.01)
    objects = results["privacy"]["objects"]
    assert objects["background"]["mi_bits"] == 0 and objects["foreground"]["mi_bits"] > 0
    assert set(results["privacy"]["embedding_similarity"]) == {"foreground", "background"}
    # the run's ledger is not charged: the server used released artifacts only
    assert json.loads((trained_run / "privacy.json").read_text())["epsilon"] == epsilon_before


@pytest.mark.parametrize("kwargs,needle", [
    ({"mask_rule": "none"}, "needs masks"),
    ({"shape": (9, 9)}, "expected 8x8"),
    ({"levels": 'foreground = "L3"\nbackground = "L0"'}, "levels.foreground must be one of L0, L1, L2"),
    ({"extra": "stepz = 4"}, "unknown key 'synthesis.stepz'"),
])
def test_a_bad_task_is_a_one_line_error_and_uploads_nothing(trained_run, tmp_path, kwargs, needle):
    out = tmp_path / "out"
    code, output = cli("synth", "custom", trained_run, "--task", digits_task(tmp_path / "task", **kwargs),
                       "--out", out)
    assert code == 2 and needle in output and len(output.strip().splitlines()) == 1, output
    assert not out.exists()
