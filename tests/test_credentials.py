"""Credentials of a federation: CA, SuperLink certificate, SuperNode key pairs."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from deploy import credentials as credentials_module
from deploy.credentials import (
    CredentialsError,
    generate_credentials,
    main,
    write_node_key_pair,
)

SECRETS = ("ca.key", "superlink.key", "supernode-0", "supernode-1")


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


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0: a file's mode is exactly what its creator asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_secrets_are_owner_only_from_creation_and_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None) -> None:
    # Prepare: watch every file the module creates, as the kernel sees it the
    # moment it is created, and every fsync
    created: dict[str, tuple[int, int]] = {}  # name -> (open flags, mode on disk)
    synced: list[int] = []
    real_open, real_fsync = os.open, os.fsync

    def spy_open(path: os.PathLike | str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if flags & os.O_CREAT:
            created[Path(path).name] = (flags, stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    def spy_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(credentials_module.os, "open", spy_open)
    monkeypatch.setattr(credentials_module.os, "fsync", spy_fsync)

    # Execute
    creds = generate_credentials(tmp_path / "creds", 2)

    # Assert: each file was created exclusively (never an existing file or link),
    # secrets 0600 from their first moment even under umask 0, public files 0644
    folder = creds.folder
    assert len(created) == 8, created
    for tmp_name, (flags, mode) in created.items():
        final = tmp_name[1:].rsplit(".", 2)[0]  # ".ca.key.<random>.tmp" -> "ca.key"
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW, tmp_name
        assert mode == (0o600 if final in SECRETS else 0o644), (tmp_name, oct(mode))
        assert stat.S_IMODE((folder / final).stat().st_mode) == mode
    # every file's content and the folder's entries reached the disk
    files = {p.stat().st_ino for p in folder.iterdir()}
    assert files <= set(synced)
    assert folder.stat().st_ino in synced
    # no temporary file is left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*SECRETS, "ca.crt", "superlink.crt", "supernode-0.pub", "supernode-1.pub"])


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    # Prepare: a node's key pair already in place
    private, public = tmp_path / "supernode-0", tmp_path / "supernode-0.pub"
    write_node_key_pair(private, public)
    before = private.read_bytes(), public.read_bytes()

    # Execute / Assert: a second pair for the same names is refused...
    with pytest.raises(CredentialsError, match="never overwritten.*supernode-0"):
        write_node_key_pair(private, public)
    # ... as is a whole federation's set over it, and by the command line
    with pytest.raises(CredentialsError, match="supernode-0"):
        generate_credentials(tmp_path, 1)
    assert main([str(tmp_path), "--nodes", "1", "--node-keys-only"]) == 1

    # Assert: the key is intact, still loads, and nothing else was written
    assert (private.read_bytes(), public.read_bytes()) == before
    assert isinstance(load_ssh_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernode-0", "supernode-0.pub"]


def test_a_key_appearing_meanwhile_is_not_replaced(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: another writer creates the key's name between the check and the link
    private, public = tmp_path / "supernode-0", tmp_path / "supernode-0.pub"
    real_link = os.link

    def racing_link(src: str, dst: os.PathLike) -> None:
        if Path(dst) == private:
            private.write_bytes(b"the other writer's key")
        real_link(src, dst)

    monkeypatch.setattr(credentials_module.os, "link", racing_link)

    # Execute / Assert
    with pytest.raises(CredentialsError, match="already exists"):
        write_node_key_pair(private, public)
    assert private.read_bytes() == b"the other writer's key"
    assert [p.name for p in tmp_path.iterdir()] == ["supernode-0"]  # no temporary left
