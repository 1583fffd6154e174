"""`fedemb deploy shards`: each device's own data file holds exactly its training user's examples, in the
format a device reads, and asking for more devices than users is a one-line error that writes nothing."""

import json

import numpy as np

from fedemb.config import load_config
from fedemb.data.store import load_splits
from fedemb.deploy.device_data import device_population
from tests.helpers import cli

SMALL = ["data.num_users=40", "sampling.users_per_client=1"]


def test_each_device_file_holds_its_users_examples_and_nothing_else(tmp_path):
    args = [a for s in SMALL for a in ("--set", s)]
    code, output = cli("deploy", "shards", tmp_path / "shards", "--devices", "3", *args)
    assert code == 0 and "3 devices' data" in output, output
    manifest = json.loads((tmp_path / "shards" / "shards.json").read_text())
    train = load_splits(load_config(None, SMALL).data).train
    assert [m["user"] for m in manifest] == [int(u) for u in train.user_ids[:3]]
    for m in manifest:
        with np.load(m["file"]) as f:
            assert set(f.files) == {"x", "y", "user"} and set(f["user"].tolist()) == {m["user"]}
            assert len(f["y"]) == m["examples"] == len(train.examples_of(m["user"]))
            np.testing.assert_array_equal(f["y"], train.labels[train.examples_of(m["user"])])
        pop = device_population({"data-path": m["file"]}, train.image_shape, train.num_classes)
        assert len(pop.labels) == m["examples"]


def test_more_devices_than_users_is_one_line_and_writes_nothing(tmp_path):
    code, output = cli("deploy", "shards", tmp_path / "shards", "--devices", "1000", "--set", "data.num_users=40")
    assert code == 2 and "training users" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "shards").exists()
