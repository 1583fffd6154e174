"""`fedemb-device`, the device owner's commands: a key whose public half names the device, a data file
from a folder of ordinary images, and a node that joins a SuperLink with TLS and node authentication,
says in plain words why it did not, reports whether it runs and stops with everything it started.
Bad input is one `error:` line and exit code 2, with nothing half-written."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedemb.deploy import device_cli
from fedemb.deploy.credentials import make_server_credentials
from fedemb.deploy.device_data import read_device_file
from fedemb.deploy.device_node import Address, log_lines, reason_from_log
from fedemb.os_processes import alive, find, group_running
from tests.helpers import save_image

pytestmark = pytest.mark.processes  # SuperLinks and SuperNodes: one such test at a time (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
SUPERLINK = Address("127.0.0.1", 9092)


def device(capsys, *args):
    """The CLI in this process, through its own entry point: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["fedemb-device", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as done:
            device_cli.main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return done.value.code, out, err


def device_process(*args, timeout=120):
    """The CLI as a separate process, as a device owner runs it."""
    done = subprocess.run([sys.executable, "-m", "fedemb.deploy.device_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def assert_one_error_line(code, err, *phrases):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for phrase in phrases:
        assert phrase in err, err


# --- key -------------------------------------------------------------------------------------------

def test_default_names_differ_between_devices_and_the_public_key_carries_the_name(tmp_path, capsys):
    names = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        code, out, _ = device(capsys, "key", "--folder", folder)
        assert code == 0
        name = re.search(r"by the name (\S+)", out)[1]
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{6}", name)
        assert f"copy {folder / 'node.key.pub'} to the server; it registers it by the name {name}" in out
        assert (folder / "node.key.pub").read_text().split()[2] == name
        assert stat.S_IMODE(os.stat(folder / "node.key").st_mode) == 0o600
        assert sorted(p.name for p in folder.iterdir()) == ["device.json", "node.key", "node.key.pub"]  # no CA
        names.append(name)
    assert names[0] != names[1]


def test_a_key_is_never_overwritten_without_force_and_names_stay_plain(tmp_path, capsys):
    folder = tmp_path / "dev"
    assert device(capsys, "key", "--folder", folder, "--name", "phone.1_a-b")[0] == 0
    first = (folder / "node.key").read_bytes()
    code, _, err = device(capsys, "key", "--folder", folder)
    assert_one_error_line(code, err, "already has a key (phone.1_a-b)", "--force")
    assert (folder / "node.key").read_bytes() == first
    assert device(capsys, "key", "--folder", folder, "--force", "--name", "tablet")[0] == 0
    assert (folder / "node.key").read_bytes() != first
    assert (folder / "node.key.pub").read_text().rstrip().endswith(" tablet")
    for bad in ("my phone", "../x", "-x", "é", "x" * 65):
        code, _, err = device(capsys, "key", "--folder", tmp_path / "other", "--name", bad)
        assert_one_error_line(code, err, "letters, digits")
    assert not (tmp_path / "other" / "node.key").exists()


def test_the_default_folder_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDEMB_DEVICE_HOME", str(tmp_path / "home"))
    assert device(capsys, "key", "--name", "n1")[0] == 0
    assert (tmp_path / "home" / "node.key").is_file()


# --- data ------------------------------------------------------------------------------------------

def mixed_folder(root: Path) -> Path:
    """Two classes of images as people have them: RGBA, L and P, PNG, JPEG and BMP, all sizes."""
    transparent = Image.new("RGBA", (10, 7), (0, 0, 0, 0))
    save_image(root / "0" / "transparent.png", transparent)
    save_image(root / "0" / "gray.jpg", Image.new("L", (33, 20), 100), quality=95)
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 200, 200, 200] + [0] * 762)
    save_image(root / "1" / "palette.png", palette)
    save_image(root / "1" / "photo.bmp", Image.new("RGB", (64, 48), (255, 0, 0)))
    save_image(root / "1" / "nested" / "sixteen.png", Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)))
    (root / "1" / ".DS_Store").write_bytes(b"\0finder")
    return root


def test_a_folder_of_mixed_images_becomes_a_device_file_of_one_size(tmp_path, capsys):
    out = tmp_path / "me.npz"
    code, stdout, _ = device(capsys, "data", out, "--images", mixed_folder(tmp_path / "photos"), "--size", "8x6")
    assert code == 0
    assert "class 0: 2 examples" in stdout and "class 1: 3 examples" in stdout and "(5, 1, 8, 6)" in stdout
    data = read_device_file(out)
    assert data.images.shape == (5, 1, 8, 6) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1, 1, 1] and data.users.tolist() == [0] * 5
    gray, transparent, sixteen, palette, bmp = (data.images[i, 0] for i in range(5))  # by path
    assert (transparent == 255).all(), "transparent pixels are laid on white"
    assert abs(int(gray.mean()) - 100) <= 2
    assert (sixteen == 255).all(), "16-bit white stays white"
    assert (palette == 200).all() and 70 <= int(bmp.mean()) <= 80  # red in grayscale: 0.299 x 255


def test_colour_images_keep_three_channels_and_names_map_to_ids_in_the_order_given(tmp_path, capsys):
    for name, colour in (("cat", (0, 0, 255)), ("dog", (0, 255, 0))):
        save_image(tmp_path / "pets" / name / f"{name}.png", Image.new("RGB", (4, 3), colour))
    out = tmp_path / "pets.npz"
    code, stdout, _ = device(capsys, "data", out, "--images", tmp_path / "pets", "--channels", "3",
                             "--classes", "dog,cat", "--user", "7")
    assert code == 0 and "class 0 (dog): 1 examples" in stdout and "class 1 (cat): 1 examples" in stdout
    data = read_device_file(out, user=7)
    assert data.images.shape == (2, 3, 3, 4)
    by_label = dict(zip(data.labels.tolist(), data.images[:, :, 0, 0].tolist()))
    assert by_label == {0: [0, 255, 0], 1: [0, 0, 255]}


def test_a_folder_that_cannot_make_a_data_file_is_named_in_one_line_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    save_image(tmp_path / "notes" / "0" / "a.png", Image.new("L", (4, 4)))
    (tmp_path / "notes" / "0" / "readme.txt").write_text("not a picture")
    save_image(tmp_path / "named" / "cat" / "a.png", Image.new("L", (4, 4)))
    save_image(tmp_path / "sizes" / "0" / "a.png", Image.new("L", (4, 4)))
    save_image(tmp_path / "sizes" / "1" / "b.png", Image.new("L", (5, 4)))
    out = tmp_path / "out.npz"
    cases = [(("--images", tmp_path / "empty"), ["is empty"]),
             (("--images", tmp_path / "nowhere"), ["no such folder"]),
             (("--images", tmp_path / "notes"), ["readme.txt", "not an image"]),
             (("--images", tmp_path / "named"), ["'cat' is not an integer class id", "--classes"]),
             (("--images", tmp_path / "named", "--classes", "dog,bird"), ["'cat' is not among the classes dog,bird"]),
             (("--images", tmp_path / "sizes"), ["b.png is 4x5", "a.png is 4x4", "--size"]),
             (("--images", tmp_path / "sizes", "--size", "big"), ["HEIGHTxWIDTH"]),
             (("--images", tmp_path / "sizes", "--channels", "2"), ["1 or 3"]),
             (("--images", tmp_path / "named", "--classes", "cat,cat"), ["more than once: cat"]),
             (("--images", tmp_path / "named", "--classes", "cat", "--size", "x"), ["HEIGHTxWIDTH"]),
             ((), ["--images DIR or --arrays"])]
    for args, phrases in cases:
        code, _, err = device(capsys, "data", out, *args)
        assert_one_error_line(code, err, *phrases)
        assert list(tmp_path.glob("*out.npz*")) == []


def test_arrays_someone_already_has_go_through_the_same_checks(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 5, 5), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    np.save(tmp_path / "too_bright.npy", np.full((6, 5, 5), 2.0))
    out = tmp_path / "arrays.npz"
    assert device(capsys, "data", out, "--arrays", tmp_path / "x.npy", "--labels", tmp_path / "y.npy")[0] == 0
    data = read_device_file(out)
    assert data.images.shape == (6, 1, 5, 5) and data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    code, _, err = device(capsys, "data", tmp_path / "bad.npz", "--arrays", tmp_path / "too_bright.npy",
                          "--labels", tmp_path / "y.npy")
    assert_one_error_line(code, err, "[0, 1]")
    assert not (tmp_path / "bad.npz").exists()


# --- join's input checks, status and stop without a server -----------------------------------------

def device_file(path: Path, users=(0,)) -> Path:
    np.savez(path, x=np.zeros((2 * len(users), 4, 4), dtype=np.uint8), y=np.arange(2 * len(users)) % 2,
             user=np.repeat(users, 2))
    return path


@pytest.fixture
def keyed(tmp_path, capsys):
    folder = tmp_path / "dev"
    assert device(capsys, "key", "--folder", folder, "--name", "phone")[0] == 0
    return folder


def test_join_checks_every_input_before_starting_anything(tmp_path, capsys, keyed):
    creds = make_server_credentials(tmp_path / "certs", ["127.0.0.1"])
    good = device_file(tmp_path / "me.npz")
    np.savez(tmp_path / "no_labels.npz", x=np.zeros((2, 4, 4), dtype=np.uint8))
    several = device_file(tmp_path / "several.npz", users=(1, 2))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        base = {"--superlink": "127.0.0.1:9092", "--ca": creds.ca_cert, "--data": good, "--folder": keyed}
        cases = [({"--folder": tmp_path / "keyless"}, ["no key in", "fedemb-device key"]),
                 ({"--superlink": "127.0.0.1"}, ["HOST:PORT"]),
                 ({"--superlink": "127.0.0.1:70000"}, ["HOST:PORT"]),
                 ({"--ca": tmp_path / "missing.crt"}, ["no such CA certificate file"]),
                 ({"--ca": good}, ["not a PEM certificate"]),
                 ({"--ca": tmp_path / "certs" / "ca.key"}, ["is a private key", "ca.crt"]),
                 ({"--data": tmp_path / "missing.npz"}, ["no such file"]),
                 ({"--data": tmp_path / "no_labels.npz"}, ["missing array 'y'"]),
                 ({"--data": several}, ["holds 2 users"]),
                 ({"--data": several, "--user": "5"}, ["no examples of user 5"]),
                 ({"--port": str(busy)}, [f"port {busy}", "--port"]),
                 ({"--wait": "0"}, ["--wait"])]
        for change, phrases in cases:
            args = [item for pair in (base | change).items() for item in pair]
            code, _, err = device(capsys, "join", *args)
            assert_one_error_line(code, err, *phrases)
    assert sorted(p.name for p in keyed.iterdir()) == ["device.json", "node.key", "node.key.pub"]


def stand_in_node(folder: Path) -> subprocess.Popen:
    """A process that looks like this folder's SuperNode (its name and key in its command line), in its
    own process group with a child of its own, as the real one has."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    node = subprocess.Popen([sys.executable, "-c", code, "/venv/bin/flower-supernode", str((folder / "node.key").resolve())],
                            start_new_session=True)
    (folder / "supernode.pid").write_text(str(node.pid))
    return node


def test_status_and_stop_follow_the_node_and_stop_ends_its_whole_group(tmp_path, capsys, keyed):
    node = stand_in_node(keyed)
    try:
        time.sleep(0.5)  # its child is started
        code, out, _ = device(capsys, "status", "--folder", keyed)
        assert code == 0 and f"running (pid {node.pid})" in out and "phone" in out
        code, _, err = device(capsys, "join", "--folder", keyed, "--superlink", "127.0.0.1:9092",
                              "--ca", keyed / "node.key.pub", "--data", tmp_path / "x.npz")
        assert_one_error_line(code, err, "already runs", "fedemb-device stop")
        code, out, _ = device(capsys, "stop", "--folder", keyed)
        assert code == 0 and f"pid {node.pid}" in out
        node.wait(timeout=5)
        assert not group_running(node.pid)
        assert device(capsys, "status", "--folder", keyed)[0] == 3
        code, out, _ = device(capsys, "stop", "--folder", keyed)
        assert code == 0 and "no node runs" in out
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def test_a_pid_file_left_by_a_crash_never_stops_an_unrelated_process(capsys, keyed):
    (keyed / "supernode.pid").write_text(str(os.getpid()))  # a PID the system gave to someone else since
    code, out, _ = device(capsys, "status", "--folder", keyed)
    assert code == 3 and "not running" in out
    code, out, _ = device(capsys, "stop", "--folder", keyed)
    assert code == 0 and "no node runs" in out and alive(os.getpid())


# --- reading the SuperNode's log (texts as flower-supernode 1.41 writes them) -----------------------

def flower_log(*lines: str) -> str:
    """A SuperNode log around `lines`, with Flower's colours and uvicorn's chatter."""
    head = ("\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\nINFO:     Started server process [2783]\n"
            "INFO:     Waiting for application startup.\n\x1b[92mINFO \x1b[0m:      FastAPI lifespan: startup\n"
            "INFO:     Application startup complete.\n"
            "INFO:     Uvicorn running on http://127.0.0.1:49099 (Press CTRL+C to quit)\n")
    tail = ("INFO:     Shutting down\nINFO:     Waiting for application shutdown.\n"
            "\x1b[92mINFO \x1b[0m:      FastAPI lifespan: shutdown\nINFO:     Application shutdown complete.\n"
            "INFO:     Finished server process [2783]\n")
    return head + "\n".join(lines) + "\n" + tail


def exit_305(*cause: str) -> list[str]:
    return ["\x1b[91mERROR \x1b[0m:     Exit Code: 305", "Failed to initialize the connection to the SuperLink.", *cause,
            "The SuperNode could not establish a connection to the SuperLink.", "",
            "For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>"]


UNREGISTERED = flower_log(*exit_305("[code: 2004] Failed to activate SuperNode."))
WRONG_CA = flower_log("\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.", *exit_305(
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate signature failure (_ssl.c:1006)"))
HOST_NOT_COVERED = flower_log("\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.", *exit_305(
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid "
    "for '127.0.0.1'. (_ssl.c:1006)"))
PLAIN_HTTP_SERVER = flower_log("\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.", *exit_305(
    "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"))
NOTHING_LISTENS = flower_log(*[f"\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in {s} seconds"
                               for s in (0.96, 1.53, 3.26)], "\x1b[92mINFO \x1b[0m:      Starting Flower SuperExec")
PORT_TAKEN = flower_log("ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 9094): "
                        "address already in use", "Traceback (most recent call last):",
                        '  File "/venv/bin/flower-supernode", line 8, in <module>', "    sys.exit(flower_supernode())",
                        "             ^^^^^^^^^^^^^^^^^^",
                        "RuntimeError: SuperNode Runtime HTTP API failed to start.")
ACTIVATED = flower_log("\x1b[92mINFO \x1b[0m:      SuperNode ID: 8427027162732242284")


@pytest.mark.parametrize("log, says", [
    (UNREGISTERED, ["refused to activate", "key phone is not registered", "fedemb deploy register ... phone.pub",
                    "already online"]),
    (WRONG_CA, ["TLS verification of 127.0.0.1:9092 failed (certificate signature failure)",
                "the CA file does not match the server's certificate, or the certificate does not cover 127.0.0.1"]),
    (HOST_NOT_COVERED, ["IP address mismatch, certificate is not valid for '127.0.0.1'", "does not cover 127.0.0.1"]),
    (PLAIN_HTTP_SERVER, ["TLS handshake with 127.0.0.1:9092 failed (wrong version number)"]),
    (NOTHING_LISTENS, ["nothing answers at 127.0.0.1:9092"]),
    (PORT_TAKEN, ["local port (--port) is in use", "another --port"]),
])
def test_each_way_a_node_fails_to_join_is_told_in_plain_words(log, says):
    reason = reason_from_log(log, SUPERLINK, "phone")
    assert "\n" not in reason
    for phrase in says:
        assert phrase in reason, reason


def test_an_unknown_failure_quotes_the_last_meaningful_log_lines():
    log = flower_log("\x1b[91mERROR \x1b[0m:     Something new went wrong", "ValueError: bad thing")
    assert reason_from_log(log, SUPERLINK, "phone") == ("the SuperNode stopped: Something new went wrong | "
                                                        "ValueError: bad thing")
    assert reason_from_log(flower_log(), SUPERLINK, "phone", gave_up_after=5) == (
        "the server at 127.0.0.1:9092 did not activate this node within 5 s")
    assert log_lines(ACTIVATED) == ["SuperNode ID: 8427027162732242284"]


def test_the_device_commands_need_no_torch():
    imports = "import sys, fedemb.deploy.device_cli; print(sorted(m for m in ('torch', 'ray', 'opacus', 'sklearn', " \
              "'matplotlib', 'scipy', 'tensorboard', 'flwr') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", imports], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- against a real SuperLink ----------------------------------------------------------------------

@pytest.mark.integration
def test_a_device_joins_a_tls_superlink_only_with_a_registered_key_and_the_right_ca_and_stops_cleanly(tmp_path):
    from fedemb.deploy.processes import Deployment, free_port

    server = tmp_path / "server"
    make_server_credentials(server / "certs", ["127.0.0.1", "localhost"])
    stranger_ca = make_server_credentials(tmp_path / "elsewhere", ["127.0.0.1"]).ca_cert
    folder, data, port = tmp_path / "dev", device_file(tmp_path / "me.npz"), free_port()
    deployment = Deployment(server, port=free_port())
    pids = []
    try:
        deployment.start_superlink(authenticate_nodes=True)
        assert device_process("key", "--folder", folder, "--name", "phone")[0] == 0
        join = ["join", "--folder", folder, "--superlink", deployment.address, "--data", data,
                "--port", port, "--wait", "30"]

        start = time.monotonic()
        code, out, err = device_process(*join, "--ca", server / "certs" / "ca.crt")
        assert code == 1 and "not registered" in err and "phone.pub" in err, out + err
        assert time.monotonic() - start < 25
        assert not (folder / "supernode.pid").exists()

        node_id = deployment.register(folder / "node.key.pub", "phone")
        code, out, err = device_process(*join, "--ca", stranger_ca)
        assert code == 1 and "TLS verification" in err and "CA file does not match" in err, out + err

        code, out, err = device_process(*join, "--ca", server / "certs" / "ca.crt")
        assert code == 0, out + err
        assert f"joined {deployment.address} as phone (node id {node_id}); log {folder / 'supernode.log'}" in out
        pids.append(int((folder / "supernode.pid").read_text()))
        assert eventually(lambda: len(node_processes(folder, port)) >= 2), "the SuperNode and its SuperExec"
        code, out, _ = device_process("status", "--folder", folder)
        assert code == 0 and f"running (pid {pids[0]})" in out and str(node_id) in out

        code, out, _ = device_process("stop", "--folder", folder)
        assert code == 0 and f"pid {pids[0]}" in out
        code, out, _ = device_process("status", "--folder", folder)
        assert code == 3 and "not running" in out
        assert device_process("stop", "--folder", folder)[:2] == (0, f"no node runs from {folder}\n")
    finally:
        if (folder / "supernode.pid").exists():
            device_process("stop", "--folder", folder)
        deployment.stop_all()
    assert not any(group_running(pid) for pid in pids)
    assert not node_processes(folder, port)


@pytest.mark.integration
def test_a_node_that_finds_nothing_at_the_address_gives_up_after_the_wait_and_leaves_nothing(tmp_path):
    from fedemb.deploy.processes import free_port

    ca = make_server_credentials(tmp_path / "certs", ["127.0.0.1"]).ca_cert
    folder = tmp_path / "dev"
    assert device_process("key", "--folder", folder, "--name", "phone")[0] == 0
    nowhere, port = f"127.0.0.1:{free_port()}", free_port()
    code, out, err = device_process("join", "--folder", folder, "--superlink", nowhere, "--ca", ca,
                                    "--data", device_file(tmp_path / "me.npz"), "--port", port, "--wait", "4")
    assert code == 1 and f"nothing answers at {nowhere}" in err, out + err
    assert not (folder / "supernode.pid").exists()
    assert not node_processes(folder, port)


def eventually(predicate, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def node_processes(folder: Path, port: int) -> list[int]:
    """The SuperNode (its key in its command line) and its SuperExec (the node's local port in its own)."""
    marks = [str((folder / "node.key").resolve()), f"127.0.0.1:{port}"]
    return [p.pid for p in find(lambda argv: any(m in " ".join(argv) for m in marks))]
