"""``virtman ca`` and the TLS contexts: certificates verify against their own CA only."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtman.errors import ConfigError, Conflict
from virtman.pki import init_ca, issue
from virtman.tlsconfig import (
    TlsFiles,
    add_tls_options,
    client_context,
    peer_name,
    server_context,
    tls_files,
)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    ca_dir = str(tmp_path / "ca")
    other_dir = str(tmp_path / "other")
    init_ca(ca_dir)
    init_ca(other_dir)
    return {
        "server": issue("server", str(tmp_path / "hosts"), ca_dir),
        "client": issue("client", str(tmp_path / "hosts"), ca_dir),
        "stranger": issue("stranger", str(tmp_path / "others"), other_dir),
    }


async def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, host: str = "127.0.0.1"
) -> tuple[str | None, str | None]:
    """Connect ``client`` to a loopback server using ``server``; the peer names each saw.
    Raises the client's ssl error, or ConnectionError, when the server refuses it."""
    seen: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(peer_name(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=host
        )
        try:
            # Under TLS 1.3 a client's handshake ends before the server has checked the
            # client's certificate: a refusal shows up as the first read failing.
            if await reader.read() != b"ok":
                raise ConnectionError("the server closed without answering")
            client_saw = peer_name(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()
        return await asyncio.wait_for(seen, 5), client_saw
    finally:
        srv.close()
        await srv.wait_closed()


async def test_issued_certificates_verify_both_ways(pki: dict[str, TlsFiles]) -> None:
    server_saw, client_saw = await handshake(
        server_context(pki["server"]), client_context(pki["client"])
    )
    assert (server_saw, client_saw) == ("client", "server")


async def test_localhost_and_ipv6_names_are_in_the_certificate(pki: dict[str, TlsFiles]) -> None:
    _, client_saw = await handshake(
        server_context(pki["server"]), client_context(pki["client"]), host="localhost"
    )
    assert client_saw == "server"


async def test_a_host_name_not_in_the_certificate_is_refused(pki: dict[str, TlsFiles]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await handshake(
            server_context(pki["server"]), client_context(pki["client"]), host="example.com"
        )


async def test_a_client_certificate_of_another_ca_is_refused(pki: dict[str, TlsFiles]) -> None:
    stranger = TlsFiles(pki["stranger"].cert, pki["stranger"].key, pki["client"].ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(server_context(pki["server"]), client_context(stranger))


async def test_a_client_without_certificate_is_refused(pki: dict[str, TlsFiles]) -> None:
    bare = ssl.create_default_context(cafile=pki["client"].ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(server_context(pki["server"]), bare)


async def test_a_server_of_another_ca_is_refused(pki: dict[str, TlsFiles]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server_context(pki["stranger"]), client_context(pki["client"]))


async def test_client_certificate_optional_when_not_required(pki: dict[str, TlsFiles]) -> None:
    bare = ssl.create_default_context(cafile=pki["client"].ca)
    server_saw, client_saw = await handshake(
        server_context(pki["server"], require_client_cert=False), bare
    )
    assert (server_saw, client_saw) == (None, "server")


def test_keys_are_private_and_certificates_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ca = init_ca(str(tmp_path / "ca"))
        host = issue("h1", str(tmp_path / "ca"), str(tmp_path / "ca"))
    finally:
        os.umask(old)
    for key in (ca.key, host.key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for cert in (ca.cert, host.cert):
        assert stat.S_IMODE(os.stat(cert).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert sorted(os.listdir(tmp_path / "ca")) == ["ca.crt", "ca.key", "h1.crt", "h1.key"]


def test_a_ca_is_never_overwritten(tmp_path: Path) -> None:
    ca = init_ca(str(tmp_path))
    before = Path(ca.key).read_bytes()
    with pytest.raises(Conflict, match="never overwritten"):
        init_ca(str(tmp_path))
    assert Path(ca.key).read_bytes() == before


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_bad_certificate_names_are_refused(tmp_path: Path, name: str) -> None:
    init_ca(str(tmp_path))
    with pytest.raises(ConfigError, match="certificate name"):
        issue(name, str(tmp_path), str(tmp_path))


def test_bad_hosts_are_refused(tmp_path: Path) -> None:
    init_ca(str(tmp_path))
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        issue("h", str(tmp_path), str(tmp_path), hosts=["bad host"])
    with pytest.raises(ConfigError, match="no CA"):
        issue("h", str(tmp_path / "x"), str(tmp_path / "missing"))


def test_tls_options_all_or_none(tmp_path: Path) -> None:
    import argparse

    init_ca(str(tmp_path))
    files = issue("h", str(tmp_path), str(tmp_path))
    parser = argparse.ArgumentParser()
    add_tls_options(parser)
    assert tls_files(parser.parse_args([])) is None
    full = ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]
    assert tls_files(parser.parse_args(full)) == files
    with pytest.raises(ConfigError, match="missing --tls-key, --tls-ca"):
        tls_files(parser.parse_args(full[:2]))
    with pytest.raises(ConfigError, match="does not exist"):
        tls_files(parser.parse_args([*full[:5], str(tmp_path / "nope.crt")]))


def test_cli_makes_a_ca_and_a_certificate(tmp_path: Path) -> None:
    def virtman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtman", "ca", *args],
                              capture_output=True, text=True, timeout=60)

    d = tmp_path / "pki"
    assert virtman("init", str(d)).returncode == 0
    out = virtman("issue", "node1", str(d), "--host", "10.0.0.1", "--host", "node1.example")
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate((d / "node1.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["node1.example"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"
    again = virtman("init", str(d))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    bad = virtman("issue", "../evil", str(d))
    assert bad.returncode == 2 and "certificate name" in bad.stderr
