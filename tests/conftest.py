import os
import shutil
import tempfile

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
# the tests' memory-mapped data stores (and their Ray workers') go to a fresh directory, not the user's cache
os.environ["FEDEMB_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedemb-test-store-")
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ.pop("RAY_ADDRESS", None)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist: a file's tests stay on one worker (its module fixtures are built once), and the
    tests that start Ray or Flower server processes share one group: they run one after another, so no
    two Rays run at once and no test's leftover check sees another test's processes."""
    for item in items:
        group = "processes" if item.get_closest_marker("processes") else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["FEDEMB_CACHE_DIR"], ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--qmnist-dir", default="", help="Directory with the QMNIST extended-label files "
                     "(e.g. ../shared/data/qmnist); tests that need it are skipped without it.")
    parser.addoption("--flower-cli", action="store_true", help="Also run the test that drives Flower's own CLI "
                     "(`flwr run .` on a local SuperLink, about a minute); see docs/flower.md for why it is opt-in.")


@pytest.fixture
def flower_cli(request):
    if not request.config.getoption("--flower-cli"):
        pytest.skip("needs --flower-cli")


@pytest.fixture
def qmnist_dir(request):
    path = request.config.getoption("--qmnist-dir")
    if not path:
        pytest.skip("needs --qmnist-dir")
    return path


@pytest.fixture
def flower_identity():
    """Messages need a run/task identity, which a ServerApp or ClientApp process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, request):
    """A 2-round DP run on digits (tests.helpers.train_small_run), one for each test file that asks: its
    tests add releases to the run's ledger, which another file's tests must not see."""
    from tests.helpers import train_small_run

    return train_small_run(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]) / "run")


@pytest.fixture(scope="session")
def lean_python(tmp_path_factory):
    """The python of a device-sized venv (tests/lean_env.py), built once a worker: nothing writes into it."""
    from tests.lean_env import make_lean_venv

    return make_lean_venv(tmp_path_factory.mktemp("lean") / "venv")
