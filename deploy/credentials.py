"""Generate the TLS and SuperNode-authentication credentials of a Flower federation.

Writes, into one folder:

- ``ca.crt`` / ``ca.key``: a private certificate authority. ``ca.crt`` goes to
  every machine (SuperNodes and the `flwr` CLI verify the SuperLink with it);
  ``ca.key`` stays with whoever issues certificates.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's server certificate,
  signed by the CA, valid for the given host names and IP addresses (the
  subject alternative names: the SuperLink host's public names, what
  SuperNodes put in ``--superlink`` to reach its Fleet gateway, which presents
  this same certificate) and always for loopback, where the SuperLink itself
  listens (its SuperExec, the gateway and the operator's `flwr` connect there).
- ``supernode-<i>`` / ``supernode-<i>.pub``: one EC (NIST P-384) key pair per
  SuperNode in OpenSSH format. The private key stays on that node
  (``--auth-supernode-private-key``); the public key is registered on the
  SuperLink with ``flwr supernode register``.

Every file is created anew, never replacing one: a private key is created with
mode 0600 (readable by its owner from the first moment), written under a unique
temporary name, flushed to disk and linked to its final name, which fails if
that name exists (`CredentialsError`).

Nothing is downloaded; keys come from the ``cryptography`` package, which Flower
itself depends on. Run ``python -m deploy.credentials --help``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
VALID_DAYS = 365


class CredentialsError(RuntimeError):
    """A credential file already exists: it is never overwritten."""


@dataclass(frozen=True)
class Credentials:
    """Paths of one federation's credentials (see the module docstring)."""

    folder: Path
    num_nodes: int

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.folder / "superlink.key"

    def node_key(self, index: int) -> Path:
        """SuperNode `index`'s private authentication key (OpenSSH PEM)."""
        return self.folder / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        """SuperNode `index`'s public key, to register on the SuperLink."""
        return self.folder / f"supernode-{index}.pub"


def generate_credentials(folder: Path, num_nodes: int,
                         hosts: Sequence[str] = LOOPBACK_HOSTS) -> Credentials:
    """Write a CA, a SuperLink certificate for `hosts` and `num_nodes` node key pairs.

    Parameters
    ----------
    folder : Path
        Output folder; created if missing. It must not hold any of the files to
        write (`CredentialsError`, and nothing is written).
    num_nodes : int
        SuperNode key pairs to write (``supernode-0`` .. ``supernode-<n-1>``).
    hosts : Sequence[str]
        Host names and IP addresses the SuperLink is reached at; each becomes a
        subject alternative name of its certificate, beside the loopback
        names. The first is its common name.

    Returns
    -------
    Credentials
        The paths of what was written.

    """
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink")
    folder.mkdir(parents=True, exist_ok=True)
    creds = Credentials(folder, num_nodes)
    _refuse_existing([folder / "ca.key", creds.ca_cert, creds.server_key, creds.server_cert,
                      *(p for i in range(num_nodes)
                        for p in (creds.node_key(i), creds.node_public_key(i)))])
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    _write_private(folder / "ca.key", _pem_key(ca_key))
    _write_public(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts)
    _write_private(creds.server_key, _pem_key(server_key))
    _write_public(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for index in range(num_nodes):
        write_node_key_pair(creds.node_key(index), creds.node_public_key(index))
    return creds


def write_node_key_pair(private_path: Path, public_path: Path) -> None:
    """Write one SuperNode authentication key pair (EC P-384, OpenSSH format).

    Raises `CredentialsError`, writing nothing, if either file exists.
    """
    _refuse_existing([private_path, public_path])
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_private(private_path, private)
    _write_public(public_path, public + b"\n")


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA certificate that may sign server certificates only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgan federation CA")])
    return (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, hosts: Sequence[str]) -> x509.Certificate:
    """The SuperLink's certificate, valid for `hosts` (DNS names and IP addresses)."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_HOSTS]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _builder(subject: x509.Name, issuer: x509.Name,
             public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    """A certificate builder valid from a minute ago for VALID_DAYS."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_existing(paths: Sequence[Path]) -> None:
    """Raise CredentialsError naming the credential files that already exist."""
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise CredentialsError(f"credentials are never overwritten, and these exist: "
                               f"{', '.join(existing)}; remove them or choose another folder")


def _write_private(path: Path, data: bytes) -> None:
    """Create a secret readable by its owner only (0600 from its creation)."""
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Create a certificate or public key, readable by all."""
    _write_new(path, data, 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` holding `data`, whole and on disk, or raise if it exists.

    The data goes to a fresh temporary file of `mode` (O_EXCL: never someone
    else's file or link), is fsynced, then hard-linked to `path`: the link
    fails if `path` exists, so nothing is overwritten, and `path` never holds
    a partial file. The folder is fsynced so the new name survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CredentialsError(f"{path} already exists; credentials are never "
                                   f"overwritten: remove it or choose another folder") from None
    finally:
        os.unlink(tmp)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write credentials for a federation."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.credentials",
        description="Write a CA, the SuperLink's TLS certificate and SuperNode key pairs.")
    parser.add_argument("folder", type=Path, help="output folder")
    parser.add_argument("--nodes", type=int, default=2,
                        help="SuperNode key pairs to write (default: 2)")
    parser.add_argument("--node-keys-only", action="store_true",
                        help="write only the SuperNode key pairs (on a SuperNode's own "
                             "machine: its private key then never travels)")
    parser.add_argument("--host", action="append", dest="hosts", metavar="NAME_OR_IP",
                        help="a host name or IP address SuperNodes use to reach the "
                             "SuperLink host (its Fleet gateway); repeat for several "
                             "(127.0.0.1, ::1 and localhost are always included)")
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error(f"--nodes must be >= 0, got {args.nodes}")
    try:
        if args.node_keys_only:
            args.folder.mkdir(parents=True, exist_ok=True)
            creds = Credentials(args.folder, args.nodes)
            _refuse_existing([p for i in range(args.nodes)
                              for p in (creds.node_key(i), creds.node_public_key(i))])
            for index in range(args.nodes):
                write_node_key_pair(creds.node_key(index), creds.node_public_key(index))
            print(f"wrote {args.nodes} SuperNode key pairs in {args.folder}")
            return 0
        creds = generate_credentials(args.folder, args.nodes, args.hosts or LOOPBACK_HOSTS)
    except CredentialsError as exc:
        print(f"deploy.credentials: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {creds.ca_cert}, {creds.server_cert}, {creds.server_key} "
          f"and {args.nodes} SuperNode key pairs in {creds.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
