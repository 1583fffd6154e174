"""Customized synthesis from sanitized references: only what an object's level allows leaves the device.

What would leak if these failed: an L0 object's pixels reaching the payload (directly, through another
object's edges or segment, or through an embedding), raw intensities in an L1 share, a DP embedding
with less noise than its ε needs, or a server accepting a payload that holds more than its levels allow.
"""

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fedemb.errors import ConfigError, DataError
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.budget import stage_noise_multiplier
from fedemb.synth.object_privacy import (embedding_channel_bound_bits, object_privacy_report,
                                         pixel_mutual_information)
from fedemb.synth.sanitize import (payload_from_bytes, payload_to_bytes, privacy_releases, sanitize)
from fedemb.synth.task_spec import OBJECTS, CustomTask, ObjectPolicy, load_task, object_masks

SHAPE = (3, 16, 16)
OTHER = {"foreground": "background", "background": "foreground"}


def make_task(levels, epsilons=None, n=4, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack([(yy - h / 2 - i % 3) ** 2 + (xx - w / 2 + i % 2) ** 2 < (h / 3) ** 2 for i in range(n)])
    policy = {o: ObjectPolicy(levels[o], (epsilons or {}).get(o, 0.0)) for o in OBJECTS}
    return CustomTask(name="t", path=Path("task.toml"), class_names=["a", "b"], prototypes=[0, -1],
                      references=rng.random((n, *shape), dtype=np.float32),
                      reference_labels=np.arange(n, dtype=np.int64) % 2, masks=masks, policy=policy,
                      test_images=rng.random((3, *shape), dtype=np.float32), test_labels=np.array([0, 1, 0]),
                      delta=1e-5, seed=0, synthesis={})


def task_stage(seed=0, ledger=None):
    """Where a task's DP embeddings are released: its own ledger (in memory here)."""
    ledger = ledger or PrivacyLedger(None, 1e-5, unit="reference image")
    return LedgerStage(ledger, "customized synthesis/embeddings", NoiseSource(seed))


def fake_embed(dim=32, scale=1e3, seed=1):
    projection = np.random.default_rng(seed).standard_normal((int(np.prod(SHAPE)), dim))
    return lambda x: scale * np.tanh(x.reshape(len(x), -1) @ projection)


def scramble(task, obj, seed=5):
    """Every pixel of `obj` replaced by random values; masks unchanged."""
    region = object_masks(task.masks)[obj]
    noise = np.random.default_rng(seed).random(task.references.shape, dtype=np.float32)
    task.references = np.where(region[:, None], noise, task.references)
    return task


def payload_bytes(task, embed=None, seed=3):
    return payload_to_bytes(sanitize(task, embed, task_stage(seed)))


@pytest.mark.parametrize("other_level", ["L0", "L1", "L2"])
@pytest.mark.parametrize("l0_object", OBJECTS)
def test_changing_an_l0_objects_pixels_leaves_the_payload_identical_byte_for_byte(l0_object, other_level):
    other = OTHER[l0_object]
    levels = {l0_object: "L0", other: other_level}
    embed = fake_embed()
    before = payload_bytes(make_task(levels, {other: 3.0}), embed)
    after = payload_bytes(scramble(make_task(levels, {other: 3.0}), l0_object), embed)
    assert before == after
    # and the check can fail: scrambling the shared object does change the bytes
    assert payload_bytes(scramble(make_task(levels, {other: 3.0}), other), embed) != before


def test_all_l0_payload_has_no_image_derived_arrays():
    payload = sanitize(make_task({"foreground": "L0", "background": "L0"}), None, task_stage(0))
    assert not (payload.masks or payload.edges or payload.segments or payload.embeddings)
    names = zipfile.ZipFile(io.BytesIO(payload_to_bytes(payload))).namelist()
    assert sorted(names) == ["labels.npy", "metadata.json"]


def test_test_images_never_enter_the_payload():
    levels = {"foreground": "L2", "background": "L1"}
    task = make_task(levels)
    before = payload_bytes(task)
    task.test_images = np.zeros_like(task.test_images)
    assert payload_bytes(task) == before


def test_l2_payload_reproduces_the_segment_exactly_and_nothing_outside():
    task = make_task({"foreground": "L2", "background": "L0"})
    payload = sanitize(task, None, task_stage(0))
    np.testing.assert_array_equal(payload.masks["foreground"], task.masks)
    np.testing.assert_array_equal(payload.segments["foreground"], np.where(task.masks[:, None], task.references, 0))
    assert payload.segment(1, "background") is None and payload.mask(1, "background") is None


def test_l1_payload_holds_the_mask_and_edges_but_not_absolute_intensities():
    task = make_task({"foreground": "L1", "background": "L0"})
    task.references *= 0.5
    payload = sanitize(task, None, task_stage(0))
    assert set(payload.masks) == {"foreground"} and not payload.segments
    np.testing.assert_array_equal(payload.masks["foreground"], task.masks)
    edges = payload.edges["foreground"]
    assert (edges[~task.masks] == 0).all() and (edges[task.masks] > 0).any()

    brighter = make_task({"foreground": "L1", "background": "L0"})
    brighter.references = np.where(task.masks[:, None], task.references * 1 + 0.4, task.references)
    shifted = sanitize(brighter, None, task_stage(0)).edges["foreground"]
    interior = np.stack([ndimage.binary_erosion(m, np.ones((3, 3))) for m in task.masks])
    np.testing.assert_allclose(shifted[interior], edges[interior], atol=1e-5)
    assert not np.allclose(shifted[task.masks & ~interior], edges[task.masks & ~interior])


def test_dp_embedding_is_unit_norm_plus_noise_of_std_twice_the_opacus_noise_multiplier():
    epsilon, dim = 2.0, 4096
    direction = np.random.default_rng(0).standard_normal(dim)
    unit = direction / np.linalg.norm(direction)
    task = make_task({"foreground": "L0", "background": "L0"}, {"foreground": epsilon}, n=6)
    stage = task_stage(0)
    payload = sanitize(task, lambda x: 1e9 * direction[None], stage)
    heard = [(e.release, e.noise_multiplier, e.sensitivity, e.neighbouring) for e in stage.ledger.entries]
    z = stage_noise_multiplier(epsilon, task.delta, "rdp")
    noise = payload.embeddings["foreground"].astype(np.float64) - unit
    assert noise.std() == pytest.approx(2 * z, rel=0.02)
    assert abs(noise.mean()) < 5 * 2 * z / np.sqrt(noise.size)
    assert heard == [("foreground embedding", z, 2.0, "replace-one")]  # sensitivity 2: one reference replaced
    assert privacy_releases(payload) == [{"object": "foreground", "epsilon": epsilon, "delta": 1e-5,
                                          "noise_multiplier": z, "sensitivity": 2.0, "count": 6}]


def test_dp_embedding_does_not_depend_on_the_embedding_norm():
    task = make_task({"foreground": "L0", "background": "L1"}, {"background": 1.0})
    small, huge = fake_embed(scale=1e-3), fake_embed(scale=1e6)
    assert payload_bytes(task, small) == payload_bytes(task, huge)


def test_embedding_epsilon_without_an_embedding_model_is_a_config_error():
    with pytest.raises(ConfigError, match="embedding_epsilon.foreground"):
        sanitize(make_task({"foreground": "L0", "background": "L0"}, {"foreground": 1.0}), None, task_stage(0))


def test_embedding_epsilon_without_a_ledger_is_a_config_error():
    with pytest.raises(ConfigError, match="no ledger"):
        sanitize(make_task({"foreground": "L0", "background": "L0"}, {"foreground": 1.0}), fake_embed())


def test_a_dp_embedding_whose_ledger_cannot_be_written_is_never_noised(tmp_path):
    drawn = []

    class Counting(NoiseSource):
        def for_entry(self, entry):
            drawn.append(entry.key)
            return super().for_entry(entry)

    ledger = PrivacyLedger(tmp_path / "missing" / "privacy.json", 1e-5, unit="reference image")
    with pytest.raises(OSError):
        sanitize(make_task({"foreground": "L0", "background": "L0"}, {"foreground": 1.0}), fake_embed(),
                 LedgerStage(ledger, "customized synthesis/embeddings", Counting(0)))
    assert drawn == []


def test_payload_bytes_are_deterministic_even_when_the_clock_moves(monkeypatch):
    task = make_task({"foreground": "L2", "background": "L1"}, {"foreground": 1.0, "background": 2.0})
    first = payload_bytes(task, fake_embed())
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 7200)
    assert payload_bytes(task, fake_embed()) == first


def test_payload_round_trips_through_bytes():
    task = make_task({"foreground": "L2", "background": "L1"}, {"background": 2.0})
    payload = sanitize(task, fake_embed(), task_stage(0))
    back = payload_from_bytes(payload_to_bytes(payload))
    assert payload_to_bytes(back) == payload_to_bytes(payload)
    assert back.levels == {"foreground": "L2", "background": "L1"} and back.image_shape == SHAPE
    np.testing.assert_array_equal(back.edge_map(2, "background"), payload.edges["background"][2])
    np.testing.assert_array_equal(back.embedding(0, "background"), payload.embeddings["background"][0])
    assert back.releases == payload.releases and back.class_names == ["a", "b"]


def rewrite(data, drop=(), replace=None, metadata=None, add=None):
    """The payload zip with members dropped, replaced or added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name in drop:
                continue
            content = src.read(name)
            if replace and name in replace:
                buffer = io.BytesIO()
                np.save(buffer, replace[name])
                content = buffer.getvalue()
            if metadata and name == "metadata.json":
                content = metadata(content.decode())
            dst.writestr(name, content)
        for name, array in (add or {}).items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            dst.writestr(name, buffer.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("corrupt,needle", [
    (lambda d: rewrite(d, drop=("segments.foreground.npy",)), "missing array segments.foreground"),
    (lambda d: rewrite(d, replace={"masks.background.npy": np.ones((4, 17, 16), bool)}), "masks.background has shape"),
    (lambda d: rewrite(d, replace={"edges.background.npy": np.full((4, 16, 16), np.nan, np.float32)}), "non-finite"),
    (lambda d: rewrite(d, add={"segments.background.npy": np.zeros((4, 3, 16, 16), np.float32)}),
     "unexpected array segments.background"),
    (lambda d: rewrite(d, metadata=lambda m: m.replace('"L1"', '"L3"')), "unknown level 'L3'"),
    (lambda d: d[: len(d) // 2], "not a payload archive"),
])
def test_corrupted_payload_is_a_one_line_data_error(corrupt, needle):
    data = payload_to_bytes(sanitize(make_task({"foreground": "L2", "background": "L1"}), None, task_stage(0)))
    with pytest.raises(DataError) as err:
        payload_from_bytes(corrupt(data))
    assert str(err.value).startswith("payload: ") and needle in str(err.value) and "\n" not in str(err.value)


# ---- the task file ----

def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.name


def write_task(tmp_path, body, size=8, channels_rgb=False, test_labels=(0, 1)):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        shape = (size, size, 3) if channels_rgb else (size, size)
        write_png(tmp_path / "refs" / f"{c}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        write_png(tmp_path / "refs" / f"{c}_mask.png", (np.eye(size) * 255).astype(np.uint8))
    np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8),
             labels=np.array(test_labels))
    path = tmp_path / "task.toml"
    path.write_text(body)
    return path


TASK = """
name = "w"
mask_rule = "file"
seed = 3
[levels]
foreground = "L2"
background = "L0"
[embedding_epsilon]
foreground = 4.0
[[classes]]
name = "a"
prototype = 3
references = ["refs/a.png"]
masks = ["refs/a_mask.png"]
[[classes]]
name = "b"
references = ["refs/b.png"]
masks = ["refs/b_mask.png"]
[test]
images = "test.npz"
[synthesis]
images_per_reference = 16
"""


def test_load_task_reads_references_masks_policy_and_test_images(tmp_path):
    task = load_task(write_task(tmp_path, TASK), (1, 8, 8))
    assert task.class_names == ["a", "b"] and task.prototypes == [3, -1] and task.seed == 3
    assert task.references.shape == (2, 1, 8, 8) and task.references.dtype == np.float32
    expected = np.asarray(Image.open(tmp_path / "refs" / "a.png"), dtype=np.float32) / 255
    np.testing.assert_array_equal(task.references[0, 0], expected)
    np.testing.assert_array_equal(task.masks[1], np.eye(8, dtype=bool))
    assert task.policy == {"foreground": ObjectPolicy("L2", 4.0), "background": ObjectPolicy("L0", 0.0)}
    assert task.test_images.shape == (2, 1, 8, 8) and task.delta == 1e-5
    assert task.synthesis == {"images_per_reference": 16}


def test_load_task_threshold_rule_and_archive_form(tmp_path):
    images = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "refs.npz", images=images, labels=np.array([0, 1, 1, 0]))
    path = tmp_path / "task.toml"
    path.write_text('name = "w"\nmask_rule = "threshold:0.3"\nreferences = "refs.npz"\n'
                    '[levels]\nforeground = "L1"\nbackground = "L0"\n'
                    '[[classes]]\nname = "a"\n[[classes]]\nname = "b"\n')
    task = load_task(path, (1, 8, 8))
    np.testing.assert_array_equal(task.masks, images[:, 0] > 0.3)
    assert task.reference_labels.tolist() == [0, 1, 1, 0] and len(task.test_images) == 0


def test_load_task_without_masks_has_one_object_covering_the_image(tmp_path):
    body = TASK.replace('mask_rule = "file"', 'mask_rule = "none"').replace('background = "L0"', 'background = "L2"')
    body = body.replace('masks = ["refs/a_mask.png"]', "").replace('masks = ["refs/b_mask.png"]', "")
    body = body.replace("foreground = 4.0", "foreground = 4.0\nbackground = 4.0")
    task = load_task(write_task(tmp_path, body), (1, 8, 8))
    assert task.objects == ("foreground",) and task.masks.all()
    assert set(object_masks(task.masks, task.objects)) == {"foreground"}


@pytest.mark.parametrize("edit,kwargs,error,needle", [
    (lambda b: b.replace('masks = ["refs/a_mask.png"]', ""), {}, ConfigError,
     "classes[0] has 1 references and 0 masks"),
    (lambda b: b, {"size": 9}, DataError, "a.png: image is 9x9, expected 8x8"),
    (lambda b: b, {"channels_rgb": True}, DataError, "a.png: image has 3 channels, expected 1"),
    (lambda b: b.replace('foreground = "L2"', 'foreground = "L3"'), {}, ConfigError,
     "levels.foreground must be one of L0, L1, L2; got 'L3'"),
    (lambda b: b.replace("refs/b.png", "refs/nope.png"), {}, DataError, "nope.png: file not found"),
    (lambda b: b, {"test_labels": (0, 2)}, DataError, "test.npz: labels must be in [0, 2)"),
    (lambda b: b.replace('mask_rule = "file"', 'mask_rule = "none"').replace('masks = ["refs/a_mask.png"]', "")
     .replace('masks = ["refs/b_mask.png"]', ""), {}, ConfigError, "needs masks"),
    (lambda b: b.replace('name = "b"', 'name = "a"'), {}, ConfigError, "duplicate class name 'a'"),
    (lambda b: b.replace('references = ["refs/b.png"]', "references = []").replace('masks = ["refs/b_mask.png"]', ""),
     {}, ConfigError, "classes[1] ('b') has no references"),
    (lambda b: "sed = 1\n" + b, {}, ConfigError, "unknown key 'sed'"),
    (lambda b: b.replace("foreground = 4.0", "foreground = -1.0"), {}, ConfigError, "embedding_epsilon.foreground"),
])
def test_load_task_bad_input_is_one_line_naming_the_problem(tmp_path, edit, kwargs, error, needle):
    path = write_task(tmp_path, edit(TASK), **kwargs)
    with pytest.raises(error) as err:
        load_task(path, (1, 8, 8))
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---- privacy measures ----

def test_pixel_mutual_information_is_zero_for_l0_and_the_raw_entropy_for_an_identical_share():
    rng = np.random.default_rng(0)
    raw = rng.random((8, 1, 32, 32))
    raw[0, 0, 0, 0], raw[0, 0, 0, 1] = 0.0, 1.0  # the share's own range is then exactly [0, 1]
    region = rng.random((8, 32, 32)) < 0.7
    region[0, 0, :2] = True
    assert pixel_mutual_information(raw, None, region)["mi_bits"] == 0.0
    same = pixel_mutual_information(raw, raw[:, 0], region)
    assert same["mi_bits"] == pytest.approx(same["raw_entropy_bits"]) and same["fraction"] == pytest.approx(1.0)
    assert same["raw_entropy_bits"] == pytest.approx(4.0, abs=0.01)  # uniform on 16 bins
    independent = pixel_mutual_information(raw, rng.random((8, 32, 32)), region)
    assert independent["mi_bits"] < 0.05


def test_object_privacy_report_ranks_l0_below_l1_below_l2():
    reports = {}
    for level in ("L1", "L2"):
        task = make_task({"foreground": level, "background": "L0"}, {"background": 1.0}, n=8)
        payload = sanitize(task, fake_embed(), task_stage(0))
        reports[level] = report = object_privacy_report(task, payload)
        assert report["background"]["mi_bits"] == 0.0 and report["background"]["level"] == "L0"
        assert report["foreground"]["embedding_mi_bound_bits"] is None
    # a segment is an exact copy of the object's pixels: all of their entropy
    assert 0 < reports["L1"]["foreground"]["fraction"] < 0.5
    assert reports["L2"]["foreground"]["fraction"] == pytest.approx(1.0)
    z = payload.releases["background"].noise_multiplier
    assert report["background"]["embedding_mi_bound_bits"] == pytest.approx(embedding_channel_bound_bits(32, 2 * z))


def test_embedding_channel_bound_shrinks_with_noise():
    assert embedding_channel_bound_bits(1, 1.0) == pytest.approx(0.5)
    assert embedding_channel_bound_bits(64, 4.0) < embedding_channel_bound_bits(64, 1.0)
