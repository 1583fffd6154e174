"""Loaders and user splits: IDX (plain and gzip), npz, QMNIST writers, synthetic partitions."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedemb.config import load_config
from fedemb.data.idx import read_idx
from fedemb.data.partition import synthetic_users
from fedemb.data.splits import load_splits
from fedemb.errors import DataError


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
