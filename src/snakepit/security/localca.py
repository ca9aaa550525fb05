"""A throwaway certificate authority, with ``cryptography``: the pool CA of ``snakepit serve``
and of the tests, and the one-command ``serve --tls-generate DIR``.

Keys are ECDSA P-256 (small, fast handshakes, what every TLS stack accepts). Files are written
atomically (a temporary file renamed over the old one), so a process that rereads them on change
never sees half a certificate; private keys are created readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CA_DAYS = 365
DEFAULT_LEAF_DAYS = 30
# Clocks of the machines that check a fresh certificate may be a little behind the issuer's.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class LocalCA:
    """A CA certificate and its key, in memory; ``issue`` signs leaf certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def generate(cls, name: str = "snakepit local CA", *, days: int = DEFAULT_CA_DAYS) -> LocalCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> LocalCA:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC private key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def issue(
        self,
        common_name: str,
        names: Sequence[str] = (),
        *,
        server: bool = True,
        client: bool = True,
        valid_for: datetime.timedelta = datetime.timedelta(days=DEFAULT_LEAF_DAYS),
    ) -> Issued:
        """A leaf certificate for ``names`` (DNS names or IP addresses, also its SANs), usable
        as a TLS server certificate, a client certificate, or both."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ] * client
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(_subject_alt_names(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_file(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; ``private`` files are mode 0600."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_issued(
    issued: Issued, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> None:
    """Write a certificate and its key; the key first, so a reader that checks the pair sees a
    mismatch (and keeps its old pair) rather than an old key with a new certificate for long."""
    write_file(key_path, issued.key_pem, private=True)
    write_file(cert_path, issued.cert_pem)


@dataclass(frozen=True)
class GeneratedFiles:
    """What ``generate_dir`` wrote: a CA, a server pair and a client pair; and the CA itself
    (``authority``, its key only in memory) to sign more with."""

    authority: LocalCA
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def generate_dir(
    directory: str | os.PathLike[str], server_names: Sequence[str] = ("localhost", "127.0.0.1")
) -> GeneratedFiles:
    """A throwaway CA in ``directory`` (``ca.pem``) with a server certificate for
    ``server_names`` and a client certificate, for ``serve --tls-generate`` and clients that
    want to try TLS and mTLS locally. The CA's key is not written: once the caller lets go of
    ``authority``, nothing more can be issued."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca = LocalCA.generate()
    files = GeneratedFiles(
        authority=ca,
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server-key.pem",
        client_cert=root / "client.pem",
        client_key=root / "client-key.pem",
    )
    write_file(files.ca, ca.cert_pem)
    write_issued(
        ca.issue("snakepit server", server_names, client=False), files.server_cert, files.server_key
    )
    write_issued(ca.issue("snakepit client", server=False), files.client_cert, files.client_key)
    return files
