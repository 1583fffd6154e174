"""Deployment plumbing: the TLS material is a real chain for the hosts the nodes dial, node keys are in
the format Flower reads, and on loopback a SuperLink with node authentication lets a registered
SuperNode in, refuses one whose key it does not know, and leaves nothing running once stopped."""

import os
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedemb.deploy.credentials import make_node_key, make_server_credentials
from fedemb.deploy.processes import Deployment, _group_alive, free_port
from fedemb.errors import ConfigError


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
def test_a_registered_supernode_connects_and_an_unknown_key_is_refused(tmp_path):
    folder = tmp_path / "deployment"
    make_server_credentials(folder / "certs", ["127.0.0.1", "localhost"])
    known, known_pub = make_node_key(folder / "keys", "node1")
    stranger, _ = make_node_key(folder / "keys", "stranger")
    deployment = Deployment(folder, port=free_port())
    try:
        deployment.start_superlink(authenticate_nodes=True)
        node_id = deployment.register(known_pub, "node1")
        deployment.start_supernode("node1", known, free_port())

        def online():
            return any(int(n.get("node-id", n.get("node_id", -1))) == node_id and "online" in str(n.get("status", ""))
                       for n in deployment.supernodes())
        assert _wait(online, 60), deployment.supernodes()

        deployment.start_supernode("stranger", stranger, free_port())
        assert _wait(lambda: not deployment.alive("stranger"), 60), "an unregistered SuperNode kept running"
        log = (folder / "logs" / "stranger.log").read_text()
        assert "Failed to activate SuperNode" in log, log[-1500:]
        assert deployment.alive("node1") and deployment.alive("superlink")
    finally:
        groups = [deployment.pid(n) for n in ("node1", "stranger", "superlink")]
        deployment.stop_all()
    assert not any(_group_alive(g) for g in groups if g is not None)
    assert not list((folder / "pids").glob("*.pid"))
