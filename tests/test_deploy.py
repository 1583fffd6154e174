"""Deployment on real processes: the TLS material is a real chain for the hosts the nodes dial, node keys
are in the format Flower reads, and on loopback DP-FedEmb runs on SuperNodes that each hold one user's
data, through a SuperLink with TLS and node authentication, and leaves nothing running."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedemb.deploy.credentials import certificate_hosts, make_node_key, make_server_credentials
from fedemb.deploy.processes import Deployment, free_port
from fedemb.deploy.registry import NodeRegistry, read_public_key
from fedemb.deploy.run_events import EventTail
from fedemb.errors import ConfigError, FedembError
from fedemb.flower_cli_run import format_status
from fedemb.os_processes import leftovers
from tests.helpers import described


def test_the_server_certificate_is_signed_by_the_ca_for_the_hosts_given(tmp_path):
    creds = make_server_credentials(tmp_path, ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    for key in (tmp_path / "ca.key", creds.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with pytest.raises(ConfigError, match="at least one host"):
        make_server_credentials(tmp_path / "x", [])


def test_node_keys_are_openssh_ecdsa_pairs(tmp_path):
    private, public = make_node_key(tmp_path, "node1")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().rstrip().endswith(" node1")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    loaded = serialization.load_ssh_public_key(public.read_bytes())
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    with pytest.raises(ConfigError):
        make_node_key(tmp_path, "../escape")


def test_the_server_certificate_says_which_hosts_it_covers_and_the_superlink_refuses_others(tmp_path):
    make_server_credentials(tmp_path / "certs", ["10.0.0.5", "s.example.org"])
    assert certificate_hosts(tmp_path / "certs" / "server.pem") == ["10.0.0.5", "s.example.org"]
    with pytest.raises(FedembError, match=r"covers 10.0.0.5, s.example.org, not 127.0.0.1: .*--hosts 127.0.0.1"):
        Deployment(tmp_path, host="127.0.0.1").start_superlink()
    assert not (tmp_path / "pids").exists()  # nothing was started


def test_device_keys_are_registered_by_the_name_they_carry(tmp_path):
    _, public = make_node_key(tmp_path / "device", "kitchen-3fa2c1")
    key = read_public_key(public)
    assert key.name == "kitchen-3fa2c1" and key.fingerprint.startswith("SHA256:")
    assert read_public_key(public, "renamed").text.endswith(" renamed\n")
    registry = NodeRegistry(tmp_path / "server" / "keys")  # the folder does not exist yet
    assert registry.conflict(key) is None and registry.registered(key) is None
    registry.add(key, 123456789012)
    assert (tmp_path / "server" / "keys" / "kitchen-3fa2c1.pub").read_text() == key.text
    assert registry.names_by_node_id() == {123456789012: "kitchen-3fa2c1"}
    assert registry.registered(key) == 123456789012  # the same key again: nothing new
    _, other = make_node_key(tmp_path / "other", "kitchen-3fa2c1")
    assert "already registered with another key" in registry.conflict(read_public_key(other))
    assert "already registered as kitchen-3fa2c1" in registry.conflict(read_public_key(public, "second-name"))
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA kitchen\n")
    with pytest.raises(ConfigError, match="not an OpenSSH ecdsa-sha2-nistp384 public key"):
        read_public_key(tmp_path / "bad.pub")
    with pytest.raises(ConfigError, match="device name"):
        read_public_key(public, "../escape")


def test_the_operator_sees_the_private_events_with_device_names(tmp_path):
    events = tmp_path / "private" / "events.log"
    events.parent.mkdir()
    tail = EventTail(tmp_path, {123456789012: "kitchen"})
    assert tail.new_lines() == []
    events.write_text("2026-11-29 16:30:01,5 INFO round 2: waiting for 1 of 4 replies until 16:31:02 UTC "
                      "(simulation.round_timeout_s = 45 s): nodes 123456789012 987654321098\npartial")
    assert tail.new_lines() == ["[server-private] 2026-11-29 16:30:01,5 INFO round 2: waiting for 1 of 4 replies "
                                "until 16:31:02 UTC (simulation.round_timeout_s = 45 s): nodes kitchen (123456789012) "
                                "987654321098"]
    with open(events, "a") as f:
        f.write(" line\n")
    assert tail.new_lines() == ["[server-private] partial line"]  # a line is shown once it is complete


def test_a_run_status_reads_as_words():
    assert format_status("finished:completed", "N/A") == "finished:completed"
    assert format_status("finished:failed", "ServerApp raised") == "finished:failed: ServerApp raised"


@pytest.mark.integration
@pytest.mark.processes
def test_the_loopback_command_runs_the_guide_on_this_machine_and_leaves_nothing_running(tmp_path):
    """`fedemb deploy loopback`: credentials, SuperLink, devices joined from their own folders with the
    device code, one round, everything stopped. (The guide's two-host version, with a tampered, a
    killed and two refused devices, is tests/test_two_hosts.py.)"""
    folder = tmp_path / "loopback"
    done = subprocess.run([sys.executable, "-m", "fedemb", "deploy", "loopback", str(folder),
                           "--devices", "1", "--port", str(free_port()), "--overrides", "run.rounds=1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert re.search(r"^node1: node id \d+, user \d+", out, re.M)
    assert re.search(r"finished:completed: 1 rounds \(completed\), recall@1 [\d.]+, epsilon [\d.]+ at delta "
                     r"1e-05 \(unit: device\)", out), out
    assert "[server-private]" in out and "1 devices online: nodes node1 (" in out
    (run_dir,) = folder.glob("run-*")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["privacy"]["unit"] == json.loads((run_dir / "privacy.json").read_text())["unit"] == "device"
    assert json.loads((folder / "keys" / "registry.json").read_text()).keys() == {"node1"}
    assert not list(folder.rglob("*.pid"))
    left = leftovers(lambda argv: str(folder) in " ".join(argv))
    assert not left, described(left)
