"""docs/deployment.md followed literally on two hosts: the server's commands run in one network
namespace, the devices' in another, joined by a veth pair with the test's own addresses. The devices
run from a lean environment (no Ray, Opacus or TensorBoard: tests/lean_env.py).

The guide's blocks marked `<!-- two-hosts: server -->` / `<!-- two-hosts: device -->` are executed as
written, with three substitutions a reader makes too: the server's address (10.0.0.5 there), the
folders (runs/deploy, incoming/ and the home folder) and, for this test's four registered devices, the
run's overrides. The `install` blocks are not run (the lean environment stands in for them; their cost is
measured by scripts/benchmark_device_install.py). The copies the guide asks for are done between blocks.

Beside the guide's device, the same commands start: another honest device (killed while it trains in
the run's round), a device with a tampered ClientApp (its unclipped update must be rejected), a
device whose key was never registered and one given another CA (both joins must fail loudly, with the
reason). At the end nothing may be left running in either namespace.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedemb.os_processes import command_line, group
from tests.netns import NamespacesUnavailable, TwoHosts

pytestmark = pytest.mark.processes  # SuperLinks and SuperNodes: one such test at a time (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deployment.md"
BLOCK = re.compile(r"<!-- two-hosts: (\w+) -->\s*```bash\n(.*?)```", re.S)
DOC_ADDRESS = "10.0.0.5"
DOC_OVERRIDES = "deployment.devices=1 deployment.min_devices=1"
# progress every 4 s: at least one line falls between the other replies and the deadline, even on a loaded machine
TEST_OVERRIDES = ("deployment.devices=3 deployment.min_devices=3 run.rounds=1 simulation.round_timeout_s=30 "
                  "monitoring.wait_progress_s=4")


def guide_blocks() -> list[tuple[str, str]]:
    return [(host, body) for host, body in BLOCK.findall(GUIDE.read_text()) if host in ("server", "device")]


def test_the_guide_has_the_two_host_steps_in_order():
    hosts = [host for host, _ in guide_blocks()]
    assert hosts == ["server", "device", "server", "device", "server", "device", "server"], hosts
    text = "\n".join(body for _, body in guide_blocks())
    for needed in ("fedemb deploy credentials", "fedemb deploy superlink", "fedemb-device key", "fedemb-device data",
                   "fedemb deploy register", "fedemb-device join", "fedemb deploy run", "fedemb-device stop",
                   "fedemb deploy stop", DOC_ADDRESS, DOC_OVERRIDES):
        assert needed in text, needed


@pytest.fixture
def hosts():
    try:
        made = TwoHosts.make()
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")
    yield made
    made.remove()


class Host:
    """One machine of the guide: its namespace, home folder, working directory and PATH."""

    def __init__(self, hosts: TwoHosts, namespace: str, home: Path, cwd: Path, path_first: Path,
                 substitutions: dict[str, str]):
        self.hosts, self.namespace, self.home, self.cwd = hosts, namespace, home, cwd
        self.path_first, self.substitutions = path_first, substitutions
        home.mkdir(parents=True, exist_ok=True)

    def env(self, **extra) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FEDEMB_DEVICE", "PYTHON"))}
        return base | {"HOME": str(self.home), "PATH": f"{self.path_first}:{os.environ['PATH']}"} | extra

    def script(self, body: str) -> str:
        for old, new in self.substitutions.items():
            body = body.replace(old, new)
        return body

    def run(self, body: str, timeout: float = 240, check: bool = True, **env) -> subprocess.CompletedProcess:
        done = subprocess.run(self.hosts.command(self.namespace, ["bash", "-euo", "pipefail", "-c", self.script(body)]),
                              cwd=self.cwd, env=self.env(**env), capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"on {self.namespace}:\n{self.script(body)}\n{done.stdout}\n{done.stderr}"
        return done

    def start(self, body: str, **env) -> subprocess.Popen:
        return subprocess.Popen(self.hosts.command(self.namespace, ["bash", "-euo", "pipefail", "-c", self.script(body)]),
                                cwd=self.cwd, env=self.env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)


def write_image_folder(shard: Path, folder: Path) -> None:
    """What a device really has: PNG files in one folder per class."""
    from PIL import Image

    with np.load(shard) as data:
        x, y = data["x"], data["y"]
    pixels = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8) if x.dtype != np.uint8 else x
    for i, (image, label) in enumerate(zip(pixels, y)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.reshape(image.shape[-2:])).save(folder / str(int(label)) / f"{i}.png")


@pytest.mark.integration
def test_the_guide_on_two_hosts(hosts, lean_python, tmp_path):
    blocks = guide_blocks()
    server_folder, incoming = tmp_path / "server" / "deploy", tmp_path / "server" / "incoming"
    incoming.mkdir(parents=True)
    server = Host(hosts, hosts.server, tmp_path / "server" / "home", REPO, REPO / ".venv" / "bin",
                  {DOC_ADDRESS: hosts.server_ip, "runs/deploy": str(server_folder), "incoming/": f"{incoming}/",
                   DOC_OVERRIDES: TEST_OVERRIDES})
    device = Host(hosts, hosts.device, tmp_path / "device" / "home", tmp_path / "device", lean_python.parent,
                  {DOC_ADDRESS: hosts.server_ip})
    device_home = device.home / ".fedemb-device"

    subprocess.run([str(REPO / ".venv" / "bin" / "fedemb"), "deploy", "shards", str(tmp_path / "shards"), "--config",
                    str(REPO / "simulations/configs/deploy.toml"), "--devices", "5"], check=True, capture_output=True)
    shards = json.loads((tmp_path / "shards" / "shards.json").read_text())
    for i, shard in enumerate(shards):
        write_image_folder(Path(shard["file"]), device.home / ("my-digits" if i == 0 else f"images-{i}"))
    extra = {"honest": 9111, "tampered": 9112, "stranger": 9113, "wrongca": 9114}
    tampered_env = {"PYTHONPATH": str(REPO / "tests" / "deploy_tampered")}
    joined, killed = {}, {}
    try:
        # S: credentials for the address the devices dial, and the SuperLink listening there
        out = server.run(blocks[0][1]).stdout
        assert f"listening on {hosts.server_ip}:9092" in out, out
        # D: the guide's device makes its key and its data file; the others do the same in their folders
        out = device.run(blocks[1][1]).stdout
        guide_name = re.search(r"^device (\S+): key pair in", out, re.M)
        assert guide_name, out
        guide_name = guide_name.group(1)
        assert not [p.name for p in device_home.iterdir() if "ca" in p.name.lower()]  # a key, and no CA
        for i, (name, port) in enumerate(extra.items(), start=1):
            folder = device.home / name
            device.run(f"fedemb-device key --folder {folder} --name {name}\n"
                       f"fedemb-device data {folder}/me.npz --images ~/images-{i} --size 8x8 --channels 1")
        # the copies: the CA to the device, the public keys (not the stranger's) to the server
        shutil.copy(server_folder / "certs" / "ca.crt", device.home / "ca.crt")
        shutil.copy(device_home / "node.key.pub", incoming / f"{guide_name}.pub")
        for name in ("honest", "tampered"):
            shutil.copy(device.home / name / "node.key.pub", incoming / f"{name}.pub")
        # S: register them by name
        out = server.run(blocks[2][1]).stdout
        for name in (guide_name, "honest", "tampered"):
            assert re.search(rf"^{re.escape(name)}: node id \d+", out, re.M), out
        # D: the guide's device joins and shows its status; the others join the same way
        out = device.run(blocks[3][1]).stdout
        assert re.search(rf"joined {hosts.server_ip}:9092 as {re.escape(guide_name)} \(node id \d+\)", out), out
        # ...and so do the others, at once: two must fail, saying why, and leave nothing running
        other_ca = tmp_path / "other"
        subprocess.run([sys.executable, "-m", "fedemb", "deploy", "credentials", str(other_ca),
                        "--hosts", hosts.server_ip], check=True, capture_output=True)
        ca = {"wrongca": f"{other_ca}/certs/ca.crt"}
        joins = {name: device.start(f"fedemb-device join --folder ~/{name} --superlink {hosts.server_ip}:9092 "
                                    f"--ca {ca.get(name, '~/ca.crt')} --data ~/{name}/me.npz --port {port} --wait 30",
                                    **(tampered_env if name == "tampered" else {}))
                 for name, port in extra.items()}
        said = {name: join.communicate(timeout=60)[0] for name, join in joins.items()}
        for name in ("honest", "tampered"):
            assert joins[name].returncode == 0, said[name]
            joined[name] = int(re.search(r"node id (\d+)", said[name]).group(1))
        assert joins["stranger"].returncode == 1 and "is not registered" in said["stranger"], said["stranger"]
        assert joins["wrongca"].returncode == 1 and "TLS verification" in said["wrongca"], said["wrongca"]

        # S: status with the names; the run, during which the honest one is killed while it trains
        run = server.start(blocks[4][1])
        victim = int((device.home / "honest" / "supernode.pid").read_text())
        assert _wait_for(lambda: _client_apps(victim), 240, run, step=0.1), "the honest device got no work"
        os.killpg(victim, signal.SIGKILL)  # mid-training: no goodbye to the SuperLink
        killed["honest"] = joined["honest"]
        output, _ = run.communicate(timeout=300)
        (tmp_path / "run-output.txt").write_text(output)
        assert run.returncode == 0, output
        (run_dir,) = server_folder.glob("run-*")
        # D, then S: stop
        device.run(blocks[5][1])
        device.run("fedemb-device stop --folder ~/tampered")
        server.run(blocks[6][1])
        left = {ns: hosts.pids(ns) for ns in (hosts.server, hosts.device)}
    finally:
        cmdlines = {ns: [_cmdline(p) for p in hosts.pids(ns)] for ns in (hosts.server, hosts.device)}

    assert not any(left.values()), cmdlines  # nothing left running in either namespace
    status_lines = re.findall(r"^  (\S+): node id (\d+), (\w+)", output, re.M)
    assert {name for name, _, status in status_lines if status == "online"} == {guide_name, "honest", "tampered"}
    assert re.search(r"run \d+ finished:completed: 1 rounds \(completed\)", output), output
    assert "N/A" not in output
    # the operator saw whom the round waited for, by name, marked server-private
    assert re.search(r"\[server-private\] .*round 1: waiting for 1 of 3 replies until \d\d:\d\d:\d\d UTC .*"
                     rf"nodes honest \({killed['honest']}\)$", output, re.M), output

    results = json.loads((run_dir / "results.json").read_text())
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert results["rounds_completed"] == 1 and results["privacy"]["unit"] == "device" == ledger["unit"]
    assert {e["unit"] for e in ledger["entries"]} == {"device"}
    from fedemb.monitoring.telemetry import read_telemetry

    (only,) = read_telemetry(run_dir)
    assert (only["virtual-clients-accepted"], only["virtual-clients-rejected"]) == (1, 1)  # the guide's; tampered
    assert only["virtual-clients-failed"] + only["virtual-clients-missing"] == 1  # the killed one
    assert only["denominator"] == 3.0  # whatever arrived
    events = (run_dir / "private" / "events.log").read_text()
    assert re.search(rf"round 1: node {joined['tampered']}: update norm [\d.]+ exceeds", events), events


def _wait_for(predicate, timeout, run: subprocess.Popen, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if run.poll() is not None:
            raise AssertionError(f"the run command ended early:\n{run.stdout.read()}")
        time.sleep(step)
    raise AssertionError("timed out")


def _client_apps(pgid: int) -> list[int]:
    """The ClientApps running in process group `pgid` (a SuperNode's)."""
    return [p.pid for p in group(pgid) if any("flwr-clientapp" in part for part in command_line(p))]


def _cmdline(pid: int) -> str:
    return " ".join(command_line(pid)) or f"{pid} (gone)"


def test_without_the_rights_to_make_namespaces_the_test_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NamespacesUnavailable, match="needs root"):
        TwoHosts.make()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(NamespacesUnavailable, match="iproute2"):
        TwoHosts.make()
