"""A device installs only the base dependencies (`pip install fedemb`): Flower's SuperNode, the ClientApp and
fedemb-device must work there without Ray, Opacus, TensorBoard, scikit-learn or matplotlib, and the server-only
packages must stay out of the base dependencies."""

import importlib.util
import json
import os
import subprocess
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.lean_env import REPO, base_closure, installed_distributions

pytestmark = pytest.mark.slow

SERVER_ONLY = ("ray", "opacus", "tensorboard", "scikit-learn", "matplotlib", "scipy", "pandas", "threadpoolctl")
# psutil is not among them: fedemb-device finds and stops its SuperNode with it (fedemb.os_processes)
SERVER_ONLY_MODULES = ("ray", "opacus", "tensorboard", "sklearn", "matplotlib", "scipy")  # all in the full install

MISSING_MODULES = """
import importlib, json, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        missing.append(name)
print(json.dumps(missing))
"""

TRAIN_ON_DEVICE = """
import json, sys
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedemb.models.embedding_net import build_embedding_net, shared_state
from fedemb.privacy.clipping import global_norm
from fedemb.protocol import METRICS, UPDATE, TrainAssignment, train_message
from fedemb.training.client_task import make_task
from simulations.client_app import app
from tests.helpers import tiny_config

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what a ClientApp process sets
data_path, clip, node = sys.argv[1], float(sys.argv[2]), 3
cfg = tiny_config("deployment.devices=4", "sampling.users_per_client=1", "sampling.rate=0.5", "client.lr=0.5")
task = make_task(cfg, num_classes=10, image_shape=(1, 8, 8), training_key=5)
state = shared_state(build_embedding_net(cfg.model, (1, 8, 8), dp_enabled=True))
msg = train_message(state, TrainAssignment(1, clip, task, [(0, (node,))]), dst_node_id=node)
reply = app(msg, Context(run_id=1, node_id=node, node_config={"data-path": data_path}, state=RecordDict(), run_config={}))
update = {k: torch.from_numpy(reply.content[UPDATE][k].numpy()) for k in reply.content[UPDATE].keys()}
print(json.dumps({"norm": global_norm(update), "keys": sorted(update), "state_keys": sorted(state),
                  "metrics": dict(reply.content[METRICS])}))
"""


@pytest.fixture(scope="module")
def lean(tmp_path_factory, lean_python):
    root, python = tmp_path_factory.mktemp("device"), lean_python
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"

    def run(*args, check=True):
        # cwd: an empty folder, so that nothing there (Ray's /tmp/ray, say) passes for a package
        return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=check)
    run.python, run.root = python, root
    return run


def test_the_server_only_packages_are_missing_on_a_device_and_present_in_the_full_install(lean):
    missing = json.loads(lean(str(lean.python), "-c", MISSING_MODULES, *SERVER_ONLY_MODULES).stdout)
    assert missing == list(SERVER_ONLY_MODULES)
    assert all(importlib.util.find_spec(name) is not None for name in SERVER_ONLY_MODULES)


def test_a_device_runs_a_train_message_through_the_clientapp_and_replies_a_clipped_update(lean):
    rng = np.random.default_rng(0)
    data = lean.root / "me.npz"  # one user's digits-like 8x8 images, as a device holds them
    np.savez(data, x=rng.integers(0, 17, size=(12, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, size=12))
    clip = 0.01
    out = lean(str(lean.python), "-c", TRAIN_ON_DEVICE, str(data), str(clip))
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    metrics = reply["metrics"]
    assert metrics["num-virtual-clients"] == 1 and metrics["num-users"] == 1 and metrics["num-examples"] > 0
    assert reply["keys"] == reply["state_keys"]  # the shared model only: no head, no data
    assert metrics["update-norms"][0] > clip  # training moved further than C, so the clip did the bounding
    assert reply["norm"] <= clip * (1 + 1e-5)


def test_the_device_finds_the_flower_and_fedemb_commands_on_its_path(lean):
    bin_dir = lean.python.parent
    for script in ("flower-supernode", "flower-superexec", "flwr-clientapp", "flwr", "fedemb", "fedemb-device"):
        assert (bin_dir / script).read_text().startswith(f"#!{lean.python}\n"), script
    assert "usage" in lean("flwr-clientapp", "--help").stdout.lower()
    assert "join" in lean("fedemb-device", "--help").stdout  # the device tool, from the base install alone


def test_a_server_command_on_a_device_install_says_it_needs_the_full_install(lean):
    out = lean("fedemb", "privacy", "--set", "privacy.noise_multiplier=1.0", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        'error: this command needs the full install (pip install "fedemb[all]" / scripts/setup.sh): '
        "No module named 'opacus'"]


def test_the_base_dependencies_hold_no_server_only_package():
    base = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert not {canonicalize_name(r.name) for r in base} & set(SERVER_ONLY)
    assert not any(r.extras for r in base if canonicalize_name(r.name) == "flwr")  # flwr[simulation] brings Ray
    assert not base_closure([str(r) for r in base], installed_distributions()) & set(SERVER_ONLY)
