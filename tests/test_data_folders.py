"""Image folders (data.name = "folder"): users from a manifest, from a folder level or synthetic; classes
from folder names; images of any format, mode and size decoded once per version of the files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedemb.config import load_config
from fedemb.data import image_folder
from fedemb.data.partition import synthetic_users
from fedemb.data.splits import plan_splits
from fedemb.data.store import load_splits, materialize, open_store
from fedemb.errors import ConfigError, DataError
from tests.helpers import save_image

USERS = ("carol", "alice", "bob", "dave", "erin")  # sorted: alice=0, bob=1, carol=2, dave=3, erin=4


def mixed_image(i: int) -> tuple[Image.Image, str]:
    """The i-th of four kinds people have: L JPEG, RGB JPEG, RGBA PNG, P PNG, each of its own size."""
    size = (7 + i % 5, 5 + i % 3)
    kind = i % 4
    if kind == 0:
        return Image.new("L", size, 40 + i), "jpg"
    if kind == 1:
        return Image.new("RGB", size, (200, 10, i)), "jpg"
    if kind == 2:
        return Image.new("RGBA", size, (0, 0, 0, 0)), "png"
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 0, 90, 200] + [0] * 762)
    return palette, "png"


def manifest_tree(root: Path, per_class: int = 4, classes=("cat", "dog", "emu")) -> list[tuple[str, str, str]]:
    """root/<class>/<i>.<ext> and root/users.csv naming each file's user; (path, user, class) rows."""
    rows = []
    for c in classes:
        for i in range(per_class):
            image, ext = mixed_image(i + len(rows))
            path = f"{c}/{i}.{ext}"
            save_image(root / path, image, **({"quality": 95} if ext == "jpg" else {}))
            rows.append((path, USERS[len(rows) % len(USERS)], c))
    (root / "users.csv").write_text("path,user\n" + "".join(f"{p},{u}\n" for p, u, _ in rows))
    return rows


def folder_config(root: Path, *settings: str, cache: Path | None = None):
    extra = [f'data.cache_dir="{cache}"'] if cache else []
    return load_config(None, ['data.name="folder"', f'data.path="{root}"', *settings, *extra]).data


def user_label_pairs(splits) -> list[tuple[int, int]]:
    return sorted((int(u), int(y)) for pop in (splits.train, splits.eval)
                  for u, y in zip(pop.users, pop.labels))


def test_a_manifest_of_named_users_gives_sorted_user_ids_and_sorted_class_ids(tmp_path):
    rows = manifest_tree(tmp_path / "pets")
    splits = load_splits(folder_config(tmp_path / "pets", 'data.manifest="users.csv"', 'data.image_size="6x5"',
                                       "data.eval_users=0.4"))
    assert splits.class_names == {0: "cat", 1: "dog", 2: "emu"}
    assert splits.train.image_shape == (3, 6, 5), "colour in any image makes every image RGB"
    assert splits.train.num_users == 3 and splits.eval.num_users == 2
    users, classes = sorted(USERS), ["cat", "dog", "emu"]
    assert user_label_pairs(splits) == sorted((users.index(u), classes.index(c)) for _, u, c in rows)
    assert splits.train.images.dtype == np.uint8 and splits.train.pixel_scale == pytest.approx(1 / 255)


def test_a_label_column_overrides_the_class_folder_and_integer_user_ids_are_kept(tmp_path):
    root = tmp_path / "shots"
    lines = ["path,user,label"]
    for i in range(8):
        save_image(root / "any" / f"{i}.png", Image.new("L", (4, 4), i * 30))
        lines.append(f"any/{i}.png,{10 + i % 4},{i % 2 * 5}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    splits = load_splits(folder_config(root, 'data.manifest="m.csv"', "data.eval_users=0.25"))
    assert splits.train.image_shape == (1, 4, 4), "greyscale images only: one channel"
    assert sorted(set(splits.train.users) | set(splits.eval.users)) == [10, 11, 12, 13]
    assert sorted(set(splits.train.labels) | set(splits.eval.labels)) == [0, 5]
    assert splits.train.num_classes == 6


def test_users_from_a_folder_level_keep_integer_class_folder_ids(tmp_path):
    root = tmp_path / "people"
    for u, user in enumerate(("zoe", "amy", "max", "kim")):
        for c in ("0", "2"):
            for i in range(2):
                save_image(root / user / c / f"{i}.png", Image.new("L", (5, 4), 10 * u + int(c)))
    (root / "README.txt").write_text("files in the root itself are not images of the dataset")
    splits = load_splits(folder_config(root, 'data.user_from="folder"', "data.eval_users=0.25"))
    assert splits.class_names == {0: "0", 2: "2"} and splits.train.num_classes == 3
    expected = sorted((sorted(["zoe", "amy", "max", "kim"]).index(user), int(c))
                      for user in ("zoe", "amy", "max", "kim") for c in ("0", "2") for _ in range(2))
    assert user_label_pairs(splits) == expected
    amy = splits.train.of_users([0]) if 0 in splits.train.user_ids else splits.eval.of_users([0])
    assert sorted(int(v) for v in amy.images[:, 0, 0, 0]) == [10, 10, 12, 12]


def test_without_users_the_images_get_synthetic_users_as_an_npz_without_user_ids_does(tmp_path):
    root = tmp_path / "plain"
    for c in ("a", "b"):
        for i in range(10):
            save_image(root / c / f"{i}.png", Image.new("RGB", (3, 3), (i, 0, 0)))
    cfg = folder_config(root, "data.num_users=4", 'data.partition="iid"', "data.split_seed=3")
    plan = plan_splits(cfg)
    assert plan.raw.train.users is None
    expected = synthetic_users(np.asarray(plan.raw.train.labels), "iid", 4, cfg.dirichlet_alpha,
                               cfg.shards_per_user, 3)
    assert np.array_equal(plan.train_users, expected)


def test_an_image_turned_by_its_exif_orientation_counts_in_its_upright_size(tmp_path):
    root = tmp_path / "turned"
    save_image(root / "0" / "upright.png", Image.new("L", (4, 6), 0))  # 6 high, 4 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 6 wide and 4 high
    save_image(root / "0" / "turned.jpg", Image.new("L", (6, 4), 255), exif=exif.tobytes())
    for i in range(4):
        save_image(root / "1" / f"{i}.png", Image.new("L", (4, 6), 100))
    plan = plan_splits(folder_config(root, "data.num_users=2", 'data.partition="iid"', "data.eval_users=0.5"))
    assert plan.raw.train.images.shape == (6, 1, 6, 4)


def error_cases(tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(settings, phrases the one-line error must contain)."""
    good = tmp / "good"
    manifest_tree(good, per_class=2)
    (good / "no_user.csv").write_text("path,owner\ncat/0.jpg,alice\n")
    (good / "missing.csv").write_text("path,user\ncat/0.jpg,alice\ncat/404.png,bob\n")
    (good / "named_labels.csv").write_text("path,user,label\ncat/0.jpg,alice,cat\n")
    save_image(tmp / "notes" / "0" / "a.png", Image.new("L", (4, 4)))
    (tmp / "notes" / "0" / "readme.txt").write_text("not a picture")
    (tmp / "empty" / "cat").mkdir(parents=True)
    save_image(tmp / "sizes" / "0" / "a.png", Image.new("L", (4, 4)))
    save_image(tmp / "sizes" / "1" / "b.png", Image.new("L", (5, 4)))
    folder = ['data.name="folder"']
    return [
        ([*folder, f'data.path="{tmp / "nowhere"}"'], ["data.path", "nowhere", "no such folder"]),
        ([*folder, f'data.path="{good}"', 'data.manifest="users.tsv"'], ["users.tsv", "no such file"]),
        ([*folder, f'data.path="{good}"', 'data.manifest="no_user.csv"'],
         ["no_user.csv", "columns path and user", "path,owner"]),
        ([*folder, f'data.path="{good}"', 'data.manifest="missing.csv"'],
         ["missing.csv line 3", "cat/404.png does not exist"]),
        ([*folder, f'data.path="{good}"', 'data.manifest="named_labels.csv"'],
         ["named_labels.csv line 2", "label 'cat' is not a non-negative integer"]),
        ([*folder, f'data.path="{tmp / "notes"}"'], ["readme.txt", "not an image"]),
        ([*folder, f'data.path="{tmp / "empty"}"'], ["empty", "has no images", "root/<class>/<file>"]),
        ([*folder, f'data.path="{tmp / "sizes"}"'], ["b.png is 4x5", "a.png is 4x4", 'data.image_size = "HxW"']),
    ]


def test_each_bad_image_folder_is_named_in_one_line(tmp_path):
    for settings, phrases in error_cases(tmp_path):
        with pytest.raises(DataError) as caught:
            load_splits(load_config(None, [*settings, "data.num_users=2"]).data)
        message = str(caught.value)
        assert "\n" not in message and all(p in message for p in phrases), (settings, message)


@pytest.mark.parametrize("settings, phrase", [
    (['data.name="folder"', 'data.image_size="big"'], "data.image_size must be HEIGHTxWIDTH"),
    (['data.name="folder"', "data.channels=2"], "data.channels must be one of 0, 1, 3"),
    (['data.name="folder"', 'data.user_from="csv"'], "data.user_from must be"),
    (['data.name="folder"', 'data.user_from="folder"', 'data.manifest="u.csv"'], "set one of them"),
    (['data.name="npz"', 'data.manifest="u.csv"'], "data.manifest applies to data.name = 'folder' only"),
])
def test_image_folder_settings_are_checked_with_the_config(settings, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(None, settings)


def test_the_images_are_decoded_once_per_version_of_the_files(tmp_path, monkeypatch):
    root, cache = tmp_path / "pets", tmp_path / "cache"
    rows = manifest_tree(root, per_class=2)
    decoded = []
    read = image_folder.read_image
    monkeypatch.setattr(image_folder, "read_image", lambda file, *a: decoded.append(file) or read(file, *a))
    cfg = folder_config(root, 'data.manifest="users.csv"', 'data.image_size="4x4"', cache=cache)

    first = materialize(cfg)
    assert len(decoded) == len(rows)
    assert materialize(cfg) == first and len(decoded) == len(rows), "a second load opens the store"
    assert json.loads((first / "meta.json").read_text())["class_names"] == {"0": "cat", "1": "dog", "2": "emu"}

    other_split = folder_config(root, 'data.manifest="users.csv"', 'data.image_size="4x4"', "data.eval_users=0.4",
                                cache=cache)
    assert materialize(other_split) != first and len(decoded) == len(rows), "a new split reuses the decoded images"

    (root / "users.csv").write_text("path,user\n" + "".join(f"{p},user{i % 3}\n" for i, (p, _, _) in enumerate(rows)))
    renamed = materialize(cfg)
    assert renamed != first and len(decoded) == len(rows), "new users, same files: the store alone is rebuilt"
    assert open_store(renamed).train.num_users + open_store(renamed).eval.num_users == 3

    changed = root / rows[0][0]
    save_image(changed, Image.new("RGB", (3, 3), (0, 255, 0)), quality=95)
    os.utime(changed, ns=(changed.stat().st_mtime_ns + 10**9,) * 2)
    rebuilt = materialize(cfg)
    assert rebuilt not in (first, renamed) and len(decoded) == 2 * len(rows), "a changed file is decoded again"
    assert list(cache.glob(".*")) == [], "no half-written file is left in the cache"


@pytest.mark.slow
def test_a_manifest_folder_of_32x32_rgb_images_trains_two_rounds_and_writes_results(tmp_path):
    from fedemb.config import to_toml
    from simulations.client_app import train
    from simulations.inprocess import InProcessGrid
    from simulations.run import run_federated

    root, rng = tmp_path / "photos", np.random.default_rng(0)
    lines = ["path,user"]
    for i in range(96):
        path = f"class{i % 4}/{i}.png"
        save_image(root / path, Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        lines.append(f"{path},person-{i % 12:02d}")
    (root / "users.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, ['data.name="folder"', f'data.path="{root}"', 'data.manifest="users.csv"',
                             "run.rounds=2", "run.seed=0", "sampling.rate=0.5", "sampling.users_per_client=2",
                             "data.eval_users=0.25"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(cfg))
    run_federated(InProcessGrid(train, 2), cfg, run_dir, show_progress=False)
    written = json.loads((run_dir / "results.json").read_text())
    assert written["rounds_completed"] == 2 and written["final"]["recall_at_1"] >= 0
