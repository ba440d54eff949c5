"""Credentials of a federation: CA, SuperLink certificate, SuperNode key pairs."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from deploy.credentials import generate_credentials, main


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_superlink_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    # Prepare
    hosts = ["fl.example.org", "203.0.113.10"]

    # Execute
    creds = generate_credentials(tmp_path / "creds", 0, hosts)

    # Assert: issued by our CA (signature checked), for exactly those names, as a server
    ca, server = _certificate(creds.ca_cert), _certificate(creds.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # (loopback too: the SuperLink's own SuperExec connects to it on 127.0.0.1)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("203.0.113.10", "127.0.0.1", "::1")]
    assert server.subject.rfc4514_string() == "CN=fl.example.org"
    assert creds.server_key.is_file()


def test_node_keys_load_the_way_flower_loads_them(tmp_path: Path) -> None:
    # Prepare / Execute
    creds = generate_credentials(tmp_path / "creds", 2)

    # Assert: the private key as flower-supernode reads it, the public key as
    # `flwr supernode register` reads it; secrets readable by their owner only
    for index in range(2):
        key = load_ssh_private_key(creds.node_key(index).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert try_load_public_key(creds.node_public_key(index))
        assert stat.S_IMODE(creds.node_key(index).stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((creds.folder / "ca.key").stat().st_mode) == 0o600
    assert creds.node_public_key(0).read_text() != creds.node_public_key(1).read_text()


def test_command_line_writes_only_node_keys_when_asked(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "node"

    # Execute
    code = main([str(folder), "--nodes", "1", "--node-keys-only"])

    # Assert
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["supernode-0", "supernode-0.pub"]


def test_negative_node_count_is_rejected(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="num_nodes"):
        generate_credentials(tmp_path, -1)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--nodes", "-1"])
