"""The TLS building blocks without servers: the throwaway CA, pairs checked before use,
renewal seen (and a half-written renewal ignored), error sentences, the data path refusal."""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from snakepit.router.dataplane import choose
from snakepit.router.haproxy.process import haproxy_binary
from snakepit.security import tls
from snakepit.security.localca import LocalCA, generate_dir, write_issued
from snakepit.security.tls import (
    ChannelTls,
    ServerTls,
    TlsFiles,
    client_tls,
    explain_connect_failure,
    matching_pair,
)


def test_a_leaf_names_its_hosts_says_what_it_is_for_and_is_signed_by_the_ca() -> None:
    ca = LocalCA.generate()
    issued = ca.issue("router", ["router.ns.svc", "127.0.0.1"], client=False)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["router.ns.svc"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert matching_pair(issued.cert_pem, issued.key_pem)
    assert not matching_pair(issued.cert_pem, ca.issue("other").key_pem)
    again = LocalCA.from_pem(ca.cert_pem, ca.key_pem)
    x509.load_pem_x509_certificate(again.issue("x").cert_pem).verify_directly_issued_by(ca.cert)


def test_generated_files_keep_their_keys_private(tmp_path: Path) -> None:
    files = generate_dir(tmp_path / "tls")
    for key in (files.server_key, files.client_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert files.ca.stat().st_mode & 0o777 == 0o644
    assert matching_pair(files.server_cert.read_bytes(), files.server_key.read_bytes())
    assert not (tmp_path / "tls" / "ca-key.pem").exists()  # the CA key is never written


def test_files_are_checked_before_anything_listens(tmp_path: Path) -> None:
    files = generate_dir(tmp_path)
    with pytest.raises(ValueError, match="needs its key"):
        TlsFiles(str(files.server_cert)).check()
    with pytest.raises(ValueError, match="does not exist"):
        TlsFiles(str(files.server_cert), str(tmp_path / "missing.pem")).check()
    with pytest.raises(ValueError, match="is not the key of"):
        TlsFiles(str(files.server_cert), str(files.client_key)).check()


def test_the_server_takes_a_renewed_pair_only_once_both_halves_are_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "_STAT_INTERVAL", 0.0)
    ca = LocalCA.generate()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_issued(ca.issue("a"), cert, key)
    server = ServerTls(str(cert), str(key))
    server.credentials()
    assert server._fetch() is None  # unchanged: grpc keeps what it has
    renewed = ca.issue("b")
    cert.write_bytes(renewed.cert_pem)  # caught between the two writes
    assert server._fetch() is None
    key.write_bytes(renewed.key_pem)
    assert server._fetch() is not None
    assert server.reloads == 1
    assert server._fetch() is None


def test_a_channel_sees_its_files_change_and_keeps_a_consistent_pair(tmp_path: Path) -> None:
    ca = LocalCA.generate()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_issued(ca.issue("a"), cert, key)
    channel = ChannelTls.pool(TlsFiles.from_dir(tmp_path))
    first = channel.credentials()
    assert not channel.changed()
    assert channel.options() == [("grpc.ssl_target_name_override", tls.POOL_NAME)]
    renewed = ca.issue("b")
    cert.write_bytes(renewed.cert_pem)
    assert channel.changed()
    assert channel.credentials() is first  # the key is still the old one: keep the old pair
    key.write_bytes(renewed.key_pem)
    assert channel.credentials() is not first
    assert not channel.changed()


def test_client_keywords_choose_plaintext_a_ca_or_the_system_roots(tmp_path: Path) -> None:
    files = generate_dir(tmp_path)
    assert client_tls() is None
    with_ca = client_tls(ca=str(files.ca))
    assert with_ca is not None and with_ca.files.ca == str(files.ca)
    system = client_tls(tls=True)
    assert system is not None and system.files.ca == ""
    mutual = client_tls(str(files.ca), cert=str(files.client_cert), key=str(files.client_key))
    assert mutual is not None and mutual.files.cert == str(files.client_cert)


def test_handshake_failures_become_one_sentence() -> None:
    plaintext_server = (
        "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER"
    )
    explained = explain_connect_failure(plaintext_server, "h:1", tls=True)
    assert explained is not None and "h:1 answered in plaintext" in explained
    untrusted = "SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    explained = explain_connect_failure(untrusted, "h:1", tls=True)
    assert explained is not None and "not signed by a CA this client trusts" in explained
    assert explain_connect_failure("connection refused", "h:1", tls=True) is None
    assert explain_connect_failure("connection refused", "h:1", tls=False) is None
    # A close during the handshake is about certificates; one after it may not be (over TLS
    # 1.3 a refused client certificate looks like that too, and so does a lost connection).
    refused = "failed to connect to all addresses; last error: UNAVAILABLE: h:1: Socket closed"
    explained = explain_connect_failure(refused, "h:1", tls=True)
    assert explained is not None and "h:1 closed the TLS handshake" in explained
    explained = explain_connect_failure("Socket closed", "h:1", tls=True)
    assert explained is not None and "h:1 closed the connection (Socket closed)" in explained
    assert "client certificate" in explained and "lost under them" in explained


def test_the_haproxy_data_path_takes_tls_with_the_pools_own_tls() -> None:
    """HAProxy reaches the Python router on its internal port (pool mutual TLS), so TLS on the
    pool port alone is refused for it; with both, or the pool's alone, ``auto`` takes it."""
    with pytest.raises(ValueError, match="needs the pool's TLS too"):
        choose("haproxy", "hint", tls=True)
    assert choose("auto", "hint", tls=True)[0] == "python"
    if haproxy_binary() is not None:
        assert choose("auto", "hint", tls=True, pool_tls=True)[0] == "haproxy"
        assert choose("haproxy", "hint", pool_tls=True)[0] == "haproxy"
    strict = "python" if haproxy_binary() is None else "haproxy"  # HAProxy in front of Python
    assert choose("auto", "strict", tls=True, pool_tls=True)[0] == strict


def test_serve_removes_the_pool_directories_of_killed_serves_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from snakepit.serve import POOL_TLS_PREFIX, PoolCA

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"{POOL_TLS_PREFIX}{gone.stdout.strip()}-abc"
    live = tmp_path / f"{POOL_TLS_PREFIX}{os.getppid()}-def"
    stale.mkdir()
    live.mkdir()
    pool = PoolCA()
    assert not stale.exists()
    assert live.exists() and pool.dir.exists()
    assert pool.dir.name.startswith(f"{POOL_TLS_PREFIX}{os.getpid()}-")
    pool.remove()
    assert not pool.dir.exists()


async def test_serve_renews_its_pool_certificate_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import datetime

    from snakepit.serve import PoolCA

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool = PoolCA(validity=datetime.timedelta(seconds=0.3))
    first = (pool.dir / "tls.crt").read_bytes()
    task = asyncio.get_running_loop().create_task(pool.keep_renewed())
    await asyncio.sleep(0.25)
    task.cancel()
    renewed = (pool.dir / "tls.crt").read_bytes()
    assert renewed != first
    assert matching_pair(renewed, (pool.dir / "tls.key").read_bytes())
    pool.remove()
