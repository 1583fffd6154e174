"""Deployment on real processes: the TLS material is a real chain for the hosts the nodes dial, node keys
are in the format Flower reads, and on loopback DP-FedEmb runs on SuperNodes that each hold one user's
data, through a SuperLink with TLS and node authentication, and leaves nothing running."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedemb.deploy.credentials import make_node_key, make_server_credentials
from fedemb.deploy.processes import Deployment, free_port
from fedemb.errors import ConfigError
from fedemb.flower_cli_run import process_alive

REPO = Path(__file__).resolve().parents[1]


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


def _wait(predicate, timeout, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.mark.integration
def test_dp_fedemb_on_devices_over_tls_survives_a_lost_device_rejects_a_tampered_one_and_refuses_a_stranger(tmp_path):
    """The acceptance run: a SuperLink with TLS and node authentication, three honest SuperNodes each
    holding one user's data, one whose ClientApp was tampered with (sends its update unclipped and
    boosted), and one whose key was never registered; two rounds of DP-FedEmb; one honest device is
    killed while it trains in round 2."""
    folder, run_dir = tmp_path / "deployment", tmp_path / "run"
    make_server_credentials(folder / "certs", ["127.0.0.1", "localhost"])
    subprocess.run([sys.executable, str(REPO / "scripts/deploy/make_shards.py"), str(REPO / "simulations/configs/deploy.toml"),
                    str(tmp_path / "shards"), "--devices", "4"], check=True, capture_output=True)
    shards = json.loads((tmp_path / "shards" / "shards.json").read_text())
    deployment = Deployment(folder, port=free_port())
    honest, node_ids = ["node1", "node2", "node3"], {}
    started: list[str] = []
    try:
        deployment.start_superlink(authenticate_nodes=True)
        started.append("superlink")
        for i, name in enumerate(honest + ["tampered"]):
            private, public = make_node_key(folder / "keys", name)
            node_ids[name] = deployment.register(public, name)
            extra = {"PYTHONPATH": str(REPO / "tests" / "deploy_tampered")} if name == "tampered" else None
            deployment.start_supernode(name, private, free_port(), f"data-path='{shards[i]['file']}'", extra_env=extra)
            started.append(name)
        stranger, _ = make_node_key(folder / "keys", "stranger")
        deployment.start_supernode("stranger", stranger, free_port(), f"data-path='{shards[0]['file']}'")
        started.append("stranger")

        def online():
            status = {int(n.get("node-id", -1)): str(n.get("status", "")) for n in deployment.supernodes()}
            return all("online" in status.get(i, "") for i in node_ids.values())
        assert _wait(online, 90), deployment.supernodes()
        assert _wait(lambda: not deployment.alive("stranger"), 60), "an unregistered SuperNode kept running"
        assert "Failed to activate SuperNode" in (folder / "logs" / "stranger.log").read_text()

        run_id = deployment.submit_run(REPO, {
            "config-file": "simulations/configs/deploy.toml",
            "overrides": "run.rounds=2 deployment.devices=4 deployment.min_devices=4 simulation.round_timeout_s=90",
            "run-dir": str(run_dir)})
        victim = deployment.pid("node3")
        assert _wait(lambda: (run_dir / "checkpoints" / "round-00001.pt").is_file(), 180), deployment.run_log(run_id)
        round_1_apps = set(_client_apps(victim))
        assert _wait(lambda: set(_client_apps(victim)) - round_1_apps, 60, step=0.1), "node3 got no round-2 work"
        os.killpg(victim, signal.SIGKILL)  # mid-training: no goodbye to the SuperLink

        status = deployment.wait_for_run(run_id, 300, run_dir / "results.json")
        log = deployment.run_log(run_id)
        assert status.startswith("finished:completed"), log[-3000:]
    finally:
        groups = {name: deployment.pid(name) for name in started}
        family = _family([g for g in groups.values() if g], deployment.port)
        deployment.stop_all()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 2 and results["stop_reason"] == "completed"
    assert results["simulation_mode"] == "deployment" and results["privacy"]["unit"] == "device"
    assert "history" in results and not any("virtual-clients-accepted" in r for r in results["history"])
    from fedemb.monitoring.telemetry import read_telemetry

    first, second = read_telemetry(run_dir)  # the per-round counts are server-private telemetry
    # round 1: three honest devices in, the tampered one rejected; the mean is over the 4 registered devices
    assert (first["virtual-clients-accepted"], first["virtual-clients-rejected"]) == (3, 1)
    # round 2: the killed device is counted as failed (the SuperLink's NODE_UNAVAILABLE) or missing
    # (no reply by the round's deadline), and the denominator does not move
    assert (second["virtual-clients-accepted"], second["virtual-clients-rejected"]) == (2, 1)
    assert second["virtual-clients-failed"] + second["virtual-clients-missing"] == 1
    assert first["denominator"] == second["denominator"] == 4.0
    tampered = rf"round (\d): node {node_ids['tampered']}: update norm [\d.]+ exceeds 1 x clip norm"
    events = (run_dir / "private" / "events.log").read_text()
    assert set(re.findall(tampered, events)) == {"1", "2"}  # the server named the tampered device both times...
    assert not re.findall(tampered, log)  # ...in its private event log, not in the run's log
    ledger = json.loads((run_dir / results["privacy"]["ledger"]).read_text())
    assert len(ledger["entries"]) == 2 and 0 < results["privacy"]["epsilon"] < float("inf")
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    # nothing left running: SuperLink, SuperExecs, ServerApp, SuperNodes, ClientApps
    assert not [p for p in family if process_alive(p)], [p.cmdline() for p in family if process_alive(p)]
    assert not list((folder / "pids").glob("*.pid"))


def _client_apps(group: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if process_alive(p) and _in_group(p, group)
            and any("flwr-clientapp" in part for part in (p.info["cmdline"] or []))]


def _in_group(proc: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(proc.pid) == group
    except ProcessLookupError:
        return False


def _family(groups: list[int], port: int) -> list[psutil.Process]:
    """Every process of these process groups, and every Flower process that talks to this SuperLink's port
    (SuperExecs and the ServerApp run in sessions of their own)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(_in_group(p, g) for g in groups) or (f":{port}" in cmd and ("flwr" in cmd or "flower" in cmd)):
            out.append(p)
    return out
