"""Loaders and user splits: IDX (plain and gzip), npz and npy arrays in every layout and dtype (resized and
converted to the configured channels, bad arrays refused in one line), QMNIST writers, synthetic partitions."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from fedemb.config import load_config
from fedemb.data import conform, npz_format
from fedemb.data.idx import read_idx
from fedemb.data.loaders import load_dataset, load_npy_dataset
from fedemb.data.partition import synthetic_users
from fedemb.data.store import load_splits, materialize, open_store
from fedemb.errors import ConfigError, DataError


def write_idx(path: Path, array: np.ndarray, code: int = 0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(">u1" if code == 0x08 else ">i4").tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_mnist_like(root: Path, n=400, gz=False):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    labels = rng.integers(0, 10, n)
    images = (rng.random((n, 28, 28)) * 50).astype(np.uint8)
    images[np.arange(n), labels * 2, :] = 255  # a class-dependent stripe
    write_idx(root / f"train-images-idx3-ubyte{sfx}", images)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", labels)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", images[:100])
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", labels[:100])
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    images, labels = make_mnist_like(tmp_path, gz=gz)
    sfx = ".gz" if gz else ""
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{sfx}"), images)
    assert np.array_equal(read_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}"), labels)


def test_idx_with_qmnist_style_writers_splits_by_writer(tmp_path):
    images, labels = make_mnist_like(tmp_path)
    writers = np.repeat(np.arange(40), 10)
    table = np.zeros((len(labels), 8), dtype=np.int64)
    table[:, 0], table[:, 2] = labels, writers
    write_idx(tmp_path / "writers.gz", table, code=0x0C)
    cfg = load_config(None, ['data.name="idx"', f'data.path="{tmp_path}"', f'data.writers="{tmp_path / "writers.gz"}"',
                             "data.eval_users=0.25"])
    s = load_splits(cfg.data)
    assert s.train.num_users == 30 and s.eval.num_users == 10
    assert not set(s.train.user_ids) & set(s.eval.user_ids)
    assert s.train.image_shape == (1, 28, 28)


def test_writer_file_for_the_wrong_split_is_refused(tmp_path):
    _, labels = make_mnist_like(tmp_path)
    table = np.zeros((len(labels), 8), dtype=np.int64)
    table[:, 0] = (labels + 1) % 10
    write_idx(tmp_path / "w.gz", table, code=0x0C)
    cfg = load_config(None, ['data.name="idx"', f'data.path="{tmp_path}"', f'data.writers="{tmp_path / "w.gz"}"'])
    with pytest.raises(DataError, match="does not match the image labels"):
        load_splits(cfg.data)


def test_test_split_is_used_for_evaluation_when_asked(tmp_path):
    make_mnist_like(tmp_path)
    cfg = load_config(None, ['data.name="idx"', f'data.path="{tmp_path}"', "data.use_test_split=true", "data.num_users=20"])
    s = load_splits(cfg.data)
    assert len(s.eval) == 100 and len(s.train) == 400


def test_npz_with_users(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((120, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 4, 120), user=np.repeat(np.arange(12), 10))
    cfg = load_config(None, ['data.name="npz"', f'data.path="{tmp_path / "d.npz"}"', "data.eval_users=0.25"])
    s = load_splits(cfg.data)
    assert s.train.num_users == 9 and s.eval.num_users == 3 and s.train.image_shape == (1, 12, 12)


def test_held_out_classes_are_excluded_from_training_and_alone_in_evaluation():
    cfg = load_config(None, ["data.held_out_classes=[7, 8, 9]"])
    s = load_splits(cfg.data)
    assert not np.isin(s.train.labels, [7, 8, 9]).any()
    assert set(np.unique(s.eval.labels)) == {7, 8, 9}


def test_public_users_are_disjoint_from_private_and_evaluation_users():
    s = load_splits(load_config(None, ["data.public_users=0.1"]).data)
    pub, tr, ev = set(s.public.user_ids), set(s.train.user_ids), set(s.eval.user_ids)
    assert pub and not (pub & tr) and not (pub & ev) and not (tr & ev)


@pytest.mark.parametrize("kind", ["iid", "shards", "dirichlet"])
def test_synthetic_partitions_cover_every_example_and_every_user(kind):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    users = synthetic_users(labels, kind, 50, 0.3, 2, seed=0)
    assert len(users) == 1000 and set(users.tolist()) == set(range(50))


def test_shards_give_each_user_few_classes():
    labels = np.repeat(np.arange(10), 100)
    users = synthetic_users(labels, "shards", 50, 1.0, 2, seed=0)
    assert max(len(set(labels[users == u])) for u in range(50)) <= 3


def test_real_qmnist_writers_align_with_labels(qmnist_dir):
    """With --qmnist-dir (e.g. ../shared/data/qmnist): 539 train writers, 297 test writers, disjoint."""
    from fedemb.data.idx import read_idx as read

    train = read(Path(qmnist_dir) / "qmnist-train-labels-idx2-int.gz")
    test = read(Path(qmnist_dir) / "qmnist-test-labels-idx2-int.gz")[:10000]
    assert len(set(train[:, 2])) == 539 and len(set(test[:, 2])) == 297
    assert not set(train[:, 2]) & set(test[:, 2])


def test_npy_directory_is_read_memory_mapped_and_split_by_user(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, size=(300, 12, 12), dtype=np.uint8))
    np.save(tmp_path / "y.npy", rng.integers(0, 5, size=300))
    np.save(tmp_path / "user.npy", np.repeat(np.arange(30), 10))
    cfg = load_config(None, ['data.name="npy"', f'data.path="{tmp_path}"'])
    s = load_splits(cfg.data)
    assert s.train.num_users + s.eval.num_users == 30
    assert set(s.train.user_ids).isdisjoint(set(np.unique(s.eval.users)))
    assert isinstance(s.train.images, np.memmap) and s.train.image_shape == (1, 12, 12)
    assert all(len(s.train.examples_of(u)) == 10 for u in s.train.user_ids)


def test_npy_directory_without_labels_is_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    from fedemb.errors import DataError

    with pytest.raises(DataError, match="missing y.npy"):
        load_splits(load_config(None, ['data.name="npy"', f'data.path="{tmp_path}"']).data)


@pytest.mark.parametrize("shape, dtype", [((6, 10, 10), np.uint8), ((6, 10, 10, 3), np.uint8), ((6, 3, 10, 10), np.float32),
                                          ((6, 10, 10, 1), np.float32), ((6, 1, 10, 10), np.uint8),
                                          ((6, 10, 10, 4), np.uint8)])
def test_npz_images_in_the_layouts_people_keep_them(tmp_path, shape, dtype):
    rng = np.random.default_rng(2)
    x = (rng.random(shape) * (255 if dtype == np.uint8 else 1)).astype(dtype)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2, user=np.arange(6) // 2)
    cfg = load_config(None, ['data.name="npz"', f'data.path="{tmp_path / "d.npz"}"', "data.eval_users=0.34"])
    s = load_splits(cfg.data)
    channels = shape[3] if len(shape) == 4 and shape[3] in (1, 3, 4) else (shape[1] if len(shape) == 4 else 1)
    assert s.train.image_shape == (channels, 10, 10)
    from fedemb.data.loaders import load_npz_dataset

    raw = load_npz_dataset(cfg.data).train.images  # the pixels, not just the shape, are where they were
    expected = x[:, None] if len(shape) == 3 else (x.transpose(0, 3, 1, 2) if shape[3] in (1, 3, 4) else x)
    assert raw.dtype == dtype and np.array_equal(raw, expected)


def test_npz_images_that_are_no_image_stack_are_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 10)), y=np.zeros(6, dtype=np.int64))
    cfg = load_config(None, ['data.name="npz"', f'data.path="{tmp_path / "d.npz"}"'])
    with pytest.raises(DataError, match=r"images must be \(n, H, W\), \(n, H, W, C\) or \(n, C, H, W\), got shape \(6, 10\)"):
        load_splits(cfg.data)


# --- array layouts, dtypes, resizing and channels for npz and npy sources ------------------------------

LAYOUTS = {  # name: (shape of 6 images of 10x10, channels the model sees)
    "NHW": ((6, 10, 10), 1), "NHW1": ((6, 10, 10, 1), 1), "NHW3": ((6, 10, 10, 3), 3),
    "N1HW": ((6, 1, 10, 10), 1), "N3HW": ((6, 3, 10, 10), 3), "NHW4": ((6, 10, 10, 4), 4),
}


def random_images(shape, dtype, seed=0) -> np.ndarray:
    values = np.random.default_rng(seed).random(shape)
    return (values * 255).round().astype(np.uint8) if dtype == np.uint8 else values.astype(dtype)


def as_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    return x.transpose(0, 3, 1, 2) if x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4) else x


def write_arrays(tmp_path: Path, source: str, x, y, user=None) -> list[str]:
    """x, y (and user) as an .npz or an npy directory; the config settings that read them."""
    arrays = {"x": x, "y": y, **({} if user is None else {"user": user})}
    if source == "npz":
        np.savez(tmp_path / "d.npz", **arrays)
        path = tmp_path / "d.npz"
    else:
        path = tmp_path / "arrays"
        path.mkdir(exist_ok=True)
        for name, array in arrays.items():
            np.save(path / f"{name}.npy", array)
    return [f'data.name="{source}"', f'data.path="{path}"', f'data.cache_dir="{tmp_path / "cache"}"',
            "data.eval_users=0.34"]


def stored_images(settings) -> np.ndarray:
    """Every image of the built store, in the source's row order."""
    splits = open_store(materialize(load_config(None, settings).data))
    images = np.concatenate([splits.train.images, splits.eval.images])
    users = np.concatenate([splits.train.users, splits.eval.users])
    return images[np.argsort(users, kind="stable")]  # users 0..2 own rows 0-1, 2-3, 4-5


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_npy_directory_reads_every_layout_memory_mapped_and_stores_it_channels_first(tmp_path, layout, dtype):
    shape, channels = LAYOUTS[layout]
    x = random_images(shape, dtype)
    settings = write_arrays(tmp_path, "npy", x, np.arange(6) % 2, np.arange(6) // 2)
    raw = load_npy_dataset(load_config(None, settings).data).train.images
    assert isinstance(raw, np.memmap), "a view of the file, not a copy in memory"
    stored = stored_images(settings)
    assert stored.shape == (6, channels, 10, 10)
    assert stored.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
    assert np.array_equal(stored, as_nchw(x).astype(stored.dtype))


def bad_cases():
    """(what to write, phrase the message must hold, the array it must name)."""
    rng = np.random.default_rng(0)
    good_x, good_y = rng.random((6, 8, 8)), np.arange(6) % 2
    nan_x = good_x.copy()
    nan_x[3, 2, 2] = np.nan
    inf_x = good_x.copy()
    inf_x[4, 0, 0] = np.inf
    return [
        (dict(x=rng.random((6, 8))), "images must be (n, H, W), (n, H, W, C) or (n, C, H, W), got shape (6, 8)", "x"),
        (dict(x=rng.random((6, 1, 8, 8, 1))), "got shape (6, 1, 8, 8, 1)", "x"),
        (dict(x=rng.random((6, 5, 8, 8))), "has no channel axis", "x"),
        (dict(x=rng.random((6, 8, 8, 2))), "has no channel axis", "x"),
        (dict(x=np.zeros((6, 8, 8), dtype=bool)), "got dtype bool", "x"),
        (dict(x=np.zeros((6, 8, 8), dtype=np.complex64)), "got dtype complex64", "x"),
        (dict(x=np.full((6, 8, 8), "a")), "got dtype <U1", "x"),
        (dict(x=nan_x), "NaN or infinite pixel values (the first in image 3)", "x"),
        (dict(x=inf_x), "NaN or infinite pixel values (the first in image 4)", "x"),
        (dict(x=good_x * 2), "float images must lie in [0, 1]", "x"),
        (dict(x=np.full((6, 8, 8), 300, dtype=np.int16)), "integer images must be pixels in 0..255", "x"),
        (dict(y=good_y + 0.5), "labels must be integers, got dtype float64", "y"),
        (dict(y=np.array(["a"] * 6)), "labels must be integers, got dtype <U1", "y"),
        (dict(y=np.zeros((6, 2), dtype=int)), "labels must be a 1-D array (one per image), got shape (6, 2)", "y"),
        (dict(y=good_y[:5]), "5 labels for 6 images", "y"),
        (dict(y=good_y - 1), "labels must be non-negative class ids, got -1", "y"),
        (dict(user=np.zeros(7, dtype=int)), "7 user ids for 6 images", "user"),
        (dict(user=np.full(6, 0.5)), "user ids must be integers", "user"),
        (dict(user=np.zeros((3, 2), dtype=int)), "user ids must be a 1-D array", "user"),
    ]


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("arrays, phrase, array", bad_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_arrays_that_do_not_fit_are_refused_in_one_line_naming_file_array_and_problem(tmp_path, source, arrays,
                                                                                       phrase, array):
    rng = np.random.default_rng(1)
    written = {"x": rng.random((6, 8, 8)), "y": np.arange(6) % 2, "user": np.arange(6) // 2, **arrays}
    settings = write_arrays(tmp_path, source, written["x"], written["y"], written["user"])
    with pytest.raises(DataError) as caught:
        load_dataset(load_config(None, settings).data)
    message = str(caught.value)
    named = f"d.npz, array {array}:" if source == "npz" else f"{array}.npy:"
    assert "\n" not in message and phrase in message and named in message, message


def test_integral_float_labels_and_column_vectors_are_accepted(tmp_path):
    float_column, user_row = (np.arange(6) % 2).astype(float)[:, None], (np.arange(6) // 2)[None, :]
    settings = write_arrays(tmp_path, "npy", random_images((6, 8, 8), np.uint8), float_column, user_row)
    raw = load_dataset(load_config(None, settings).data)
    assert raw.train.labels.tolist() == [0, 1, 0, 1, 0, 1] and raw.train.users.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_image_size_resizes_arrays_keeping_uint8_as_uint8_and_float_as_float32(tmp_path, source, dtype):
    x = random_images((6, 12, 12, 3), dtype)
    x[0] = 1 if dtype != np.uint8 else 255  # a flat image stays flat: resizing averages, never overshoots
    settings = write_arrays(tmp_path, source, x, np.arange(6) % 2, np.arange(6) // 2)
    stored = stored_images(settings + ['data.image_size="16x20"'])
    assert stored.shape == (6, 3, 16, 20) and stored.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
    assert np.all(stored[0] == (255 if dtype == np.uint8 else 1))
    scale = 255 if dtype == np.uint8 else 1
    assert stored.min() >= 0 and stored.max() <= scale
    assert abs(float(stored[1:].mean()) - float(x[1:].mean())) < 0.02 * scale


def test_channels_convert_as_image_folders_do(tmp_path):
    red, grey, clear = [255, 0, 0, 255], [90, 90, 90, 255], [0, 0, 0, 0]
    x = np.array([[[red] * 5] * 5, [[grey] * 5] * 5, [[clear] * 5] * 5] * 2, dtype=np.uint8)  # (6, 5, 5, 4) RGBA
    settings = write_arrays(tmp_path, "npz", x, np.arange(6) % 2, np.arange(6) // 2)
    rgb = stored_images(settings + ["data.channels=3"])
    assert rgb.shape == (6, 3, 5, 5)
    assert rgb[:3, :, 0, 0].tolist() == [[255, 0, 0], [90, 90, 90], [255, 255, 255]], "alpha laid on white"
    gray = stored_images(settings + ["data.channels=1"])
    assert gray[:3, 0, 0, 0].tolist() == [76, 90, 255], "ITU-R 601 luma: 0.299 * 255 = 76"
    back_to_rgb = write_arrays(tmp_path, "npy", gray[:, 0], np.arange(6) % 2, np.arange(6) // 2)
    repeated = stored_images(back_to_rgb + ["data.channels=3"])
    assert np.array_equal(repeated, np.repeat(gray, 3, axis=1)), "grayscale repeated into R, G and B"


def test_a_resized_array_is_computed_once_per_file_version_and_settings(tmp_path, monkeypatch):
    conversions = []
    convert = conform._convert
    monkeypatch.setattr(conform, "_convert", lambda *a: conversions.append(1) or convert(*a))
    x = random_images((6, 8, 8), np.uint8)
    settings = write_arrays(tmp_path, "npy", x, np.arange(6) % 2, np.arange(6) // 2) + ['data.image_size="4x4"']
    first = load_dataset(load_config(None, settings).data).train.images
    again = load_dataset(load_config(None, settings + ["data.eval_users=0.5"]).data).train.images
    assert isinstance(first, np.memmap) and first.filename == again.filename and len(conversions) == 1
    load_dataset(load_config(None, settings + ["data.channels=3"]).data)
    assert len(conversions) == 2, "other settings: another conversion"
    x_file = tmp_path / "arrays" / "x.npy"
    np.save(x_file, 255 - x)
    os.utime(x_file, ns=(x_file.stat().st_mtime_ns + 10**9,) * 2)
    changed = load_dataset(load_config(None, settings).data).train.images
    assert len(conversions) == 3 and changed.filename != first.filename, "a changed file: converted again"
    assert list((tmp_path / "cache").glob(".*")) == [], "no half-written file is left in the cache"


def test_conversion_in_small_chunks_equals_conversion_in_one(tmp_path, monkeypatch):
    x = random_images((40, 9, 7, 3), np.float64)
    settings = write_arrays(tmp_path, "npy", x, np.arange(40) % 2, np.arange(40) // 4)
    whole = stored_images(settings + ['data.image_size="5x6"', "data.channels=1"])
    monkeypatch.setattr(npz_format, "CHUNK_BYTES", 3 * (3 * 9 * 7 * 8))  # three float64 images per chunk
    other_cache = f'data.cache_dir="{tmp_path / "other"}"'
    chunked = stored_images(settings + ['data.image_size="5x6"', "data.channels=1", other_cache])
    assert np.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("name", ["digits", "idx"])
def test_image_size_and_channels_apply_to_every_source(tmp_path, name):
    settings = [f'data.name="{name}"', 'data.image_size="12x10"', "data.channels=3", "data.num_users=20"]
    if name == "idx":
        make_mnist_like(tmp_path)
        settings.append(f'data.path="{tmp_path}"')
    splits = open_store(materialize(load_config(None, settings).data))
    assert splits.train.image_shape == (3, 12, 10) and splits.train.images.dtype == np.uint8
    assert splits.train.images.max() <= (16 if name == "digits" else 255)


@pytest.mark.parametrize("name", ["digits", "idx", "npz", "npy", "folder"])
def test_image_size_and_channels_are_settings_of_every_source(name):
    cfg = load_config(None, [f'data.name="{name}"', 'data.image_size="32x32"', "data.channels=3"])
    assert (cfg.data.image_size, cfg.data.channels) == ("32x32", 3)
    with pytest.raises(ConfigError, match="data.channels must be one of 0, 1, 3"):
        load_config(None, [f'data.name="{name}"', "data.channels=4"])
    with pytest.raises(ConfigError, match="data.image_size must be HEIGHTxWIDTH"):
        load_config(None, [f'data.name="{name}"', 'data.image_size="32"'])


@pytest.mark.parametrize("source", ["npz", "folder"])
def test_crop_resizes_only_the_centre_at_the_target_aspect_ratio(tmp_path, source):
    """A 10x20 (portrait 1:2) image cropped to 8x8 is its centre 10x10 resized: the side strips, here
    marked white, are gone; stretched, they are squeezed in."""
    from PIL import Image

    x = np.zeros((6, 10, 20), dtype=np.uint8)
    x[:, :, :5] = x[:, :, 15:] = 255  # white strips left and right of a black 10x10 centre
    if source == "npz":
        settings = write_arrays(tmp_path, "npz", x, np.arange(6) % 2, np.arange(6) // 2)
    else:
        root = tmp_path / "photos"
        lines = ["path,user"]
        for i in range(6):
            (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(root / f"c{i % 2}" / f"{i}.png")
            lines.append(f"c{i % 2}/{i}.png,u{i // 2}")
        (root / "users.csv").write_text("\n".join(lines) + "\n")
        settings = ['data.name="folder"', f'data.path="{root}"', 'data.manifest="users.csv"',
                    f'data.cache_dir="{tmp_path / "cache"}"']
    cropped = stored_images(settings + ['data.image_size="8x8"', 'data.resize="crop"'])
    stretched = stored_images(settings + ['data.image_size="8x8"'])
    assert cropped.shape == stretched.shape == (6, 1, 8, 8)
    assert cropped.max() <= 2, "only the black centre is left"
    assert stretched[:, :, :, 0].min() >= 200, "stretched: the white strips are squeezed into the edges"
    with pytest.raises(ConfigError, match="data.resize = 'crop' needs data.image_size"):
        load_config(None, settings + ['data.resize="crop"'])
    with pytest.raises(ConfigError, match="data.resize must be one of stretch, crop"):
        load_config(None, settings + ['data.resize="pad"'])
