"""NBD over TLS end to end: our server and client, `virtman serve` processes, and real
GnuTLS clients (libnbd's nbdinfo/nbdcopy, QEMU's qemu-img) through origin → relay →
overlay with TLS and client certificates on every hop.

Certificates come from ``virtman.pki`` in the test's own directory: one CA for the
cluster, one foreign CA whose certificates must be refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_image, require

from virtman.blockdev.memory import MemoryDevice
from virtman.errors import ConfigError, NetworkError
from virtman.nbd.client import NbdClient, list_exports
from virtman.nbd.server import NbdServer
from virtman.pki import init_ca, issue
from virtman.protocol.uri import NbdAddress
from virtman.tlsconfig import TlsFiles

MiB = 1024 * 1024
CLIENT_TIMEOUT = 60


@dataclass
class Pki:
    ca: str
    hosts: dict[str, TlsFiles]
    stranger: TlsFiles  # signed by another CA
    libnbd_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem (libnbd and QEMU)

    def args(self, name: str) -> list[str]:
        files = self.hosts[name]
        return ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_dir, hosts_dir = tmp_path / "ca", tmp_path / "hosts"
    init_ca(str(ca_dir))
    init_ca(str(tmp_path / "other-ca"))
    hosts = {n: issue(n, str(hosts_dir), str(ca_dir))
             for n in ("origin", "relay", "overlay", "client")}
    stranger = issue("stranger", str(tmp_path / "other"), str(tmp_path / "other-ca"))
    libnbd = tmp_path / "libnbd"
    libnbd.mkdir(mode=0o700)
    shutil.copy(hosts["client"].ca, libnbd / "ca-cert.pem")
    shutil.copy(hosts["client"].cert, libnbd / "client-cert.pem")
    shutil.copy(hosts["client"].key, libnbd / "client-key.pem")
    return Pki(str(ca_dir / "ca.crt"), hosts, stranger, libnbd)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    if check:
        assert done.returncode == 0, (
            f"{cmd[0]} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done


# --- in process: our server and our client -------------------------------------------------


async def test_client_and_server_over_tls_tcp_and_unix(pki: Pki, tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    server = NbdServer({"disk": MemoryDevice(data=data)}, tls=pki.hosts["origin"])
    port = await server.listen_tcp("127.0.0.1", 0)
    sock = str(tmp_path / "s.sock")
    await server.listen_unix(sock)
    try:
        for address in (NbdAddress("disk", host="127.0.0.1", port=port),
                        NbdAddress("disk", socket=sock, tls=True)):
            client = await NbdClient.connect(address, tls=pki.hosts["client"])
            try:
                assert await client.read(4096, 8192) == data[4096:12288]
                await client.write(0, b"x" * 512)
                assert await client.read(0, 512) == b"x" * 512
            finally:
                await client.close()
        assert await list_exports(f"nbds+unix:///?socket={sock}", tls=pki.hosts["client"]) == [
            "disk"]
        names = {c.peer_name for c in server._connections}
        assert names <= {"client"}
        assert server.stats.tls_sessions == 3 and server.stats.tls_refused == 0
    finally:
        await server.stop()


async def test_tls_server_refuses_clients_without_the_cluster_certificate(pki: Pki) -> None:
    data = os.urandom(64 * 1024)
    server = NbdServer({"disk": MemoryDevice(data=data, read_only=True)},
                       tls=pki.hosts["origin"])
    port = await server.listen_tcp("127.0.0.1", 0)
    address = NbdAddress("disk", host="127.0.0.1", port=port)
    try:
        with pytest.raises(NetworkError, match="requires TLS"):
            await NbdClient.connect(address)
        no_cert = ssl.create_default_context(cafile=pki.ca)
        with pytest.raises(NetworkError):
            await NbdClient.connect(address, tls=no_cert)
        foreign = TlsFiles(pki.stranger.cert, pki.stranger.key, pki.ca)
        with pytest.raises(NetworkError):
            await NbdClient.connect(address, tls=foreign)
        # A server whose certificate our CA did not sign is refused by the client too.
        impostor = NbdServer({"disk": MemoryDevice(data=data)}, tls=pki.stranger)
        other = await impostor.listen_tcp("127.0.0.1", 0)
        try:
            with pytest.raises(NetworkError, match="certificate verify failed"):
                await NbdClient.connect(NbdAddress("disk", host="127.0.0.1", port=other),
                                        tls=pki.hosts["client"])
        finally:
            await impostor.stop()
        assert server.stats.tls_refused == 2
        # The server still serves a client with a certificate of the cluster.
        client = await NbdClient.connect(address, tls=pki.hosts["client"])
        assert await client.read(0, 4096) == data[:4096]
        await client.close()
    finally:
        await server.stop()


async def test_plaintext_server_refuses_starttls(pki: Pki) -> None:
    server = NbdServer({"disk": MemoryDevice(size=65536)})
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        with pytest.raises(NetworkError, match="server refused STARTTLS: ERR_POLICY"):
            await NbdClient.connect(NbdAddress("disk", host="127.0.0.1", port=port),
                                    tls=pki.hosts["client"])
    finally:
        await server.stop()


async def test_nbds_uri_without_certificates_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="asks for TLS"):
        await NbdClient.connect("nbds://127.0.0.1:1/disk")


async def test_raw_bytes_before_starttls_are_tls_reqd(pki: Pki) -> None:
    """The wire, as a plaintext client sees it: GO answered TLS_REQD."""
    import asyncio

    server = NbdServer({"disk": MemoryDevice(size=65536)}, tls=pki.hosts["origin"])
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readexactly(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
        writer.write(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, len(go))
                     + go)
        magic, option, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
        assert (magic, option, reply) == (0x0003E889045565A9, 7, 0x80000005)
        await reader.readexactly(length)
        # EXPORT_NAME before TLS cannot be answered: the server closes.
        writer.write(struct.pack(">QII", 0x49484156454F5054, 1, 4) + b"disk")
        assert await reader.read() == b""
        writer.close()
    finally:
        await server.stop()


# --- `virtman serve` processes ---------------------------------------------------------------


def _tls_chain(serve, pki: Pki, tmp_path: Path, size: int = 4 * MiB + 4096):
    img = tmp_path / "disk.img"
    data = make_image(img, size)
    p_origin, p_relay, p_overlay = free_port(), free_port(), free_port()
    origin = serve("serve", str(img), "--read-only", "--listen", f"127.0.0.1:{p_origin}",
                   *pki.args("origin"), export="disk", name="origin")
    relay = serve("serve", "--upstream", f"nbds://127.0.0.1:{p_origin}/disk",
                  "--cache-dir", str(tmp_path / "cache"), "--listen", f"127.0.0.1:{p_relay}",
                  *pki.args("relay"), export="disk", name="relay")
    overlay = serve("serve", "--base", f"nbd://127.0.0.1:{p_relay}/disk",
                    "--overlay", str(tmp_path / "vm.qcow"), "--listen",
                    f"127.0.0.1:{p_overlay}", *pki.args("overlay"), export="vm", name="overlay")
    return data, img, (origin, p_origin), (relay, p_relay), (overlay, p_overlay)


async def test_tls_relay_process_refuses_plaintext_no_and_foreign_certificates(
    serve, pki: Pki, tmp_path: Path
) -> None:
    data, _, _, (relay, port), _ = _tls_chain(serve, pki, tmp_path, size=MiB)
    address = NbdAddress("disk", host="127.0.0.1", port=port)
    with pytest.raises(NetworkError, match="requires TLS"):
        await NbdClient.connect(address)
    with pytest.raises(NetworkError):
        await NbdClient.connect(address, tls=ssl.create_default_context(cafile=pki.ca))
    with pytest.raises(NetworkError):
        await NbdClient.connect(address, tls=TlsFiles(pki.stranger.cert, pki.stranger.key,
                                                       pki.ca))
    assert relay.proc.poll() is None
    log = relay.log.read_text()
    # One line per peer and kind per interval (the rate-limited log): the first refusal.
    assert "TLS handshake failed: [SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE]" in log, log
    assert "before STARTTLS (ERR_TLS_REQD)" in log
    client = await NbdClient.connect(address, tls=pki.hosts["client"])
    assert await client.read(0, MiB) == data
    await client.close()


def test_nbdinfo_and_nbdcopy_over_tls(serve, pki: Pki, tmp_path: Path) -> None:
    require("nbdinfo", "nbdcopy")
    data, _, (origin, p_origin), (relay, p_relay), (overlay, _) = _tls_chain(
        serve, pki, tmp_path)
    certs = f"tls-certificates={pki.libnbd_dir}"
    info = json.loads(run("nbdinfo", "--json", f"nbds://127.0.0.1:{p_relay}/disk?{certs}").stdout)
    assert info["exports"][0]["export-size"] == len(data)
    assert info["TLS"] is True
    dest = tmp_path / "copy.img"
    run("nbdcopy", f"nbds://127.0.0.1:{p_relay}/disk?{certs}", str(dest))
    assert dest.read_bytes() == data
    # Over the relay's Unix socket too (libnbd checks the name "localhost" there).
    unix = f"nbds+unix:///disk?socket={relay.socket}&{certs}"
    info = json.loads(run("nbdinfo", "--json", unix).stdout)
    assert info["exports"][0]["export-size"] == len(data)
    # Plaintext libnbd is refused, by the origin as by the relay.
    for port in (p_origin, p_relay):
        plain = run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/disk", check=False)
        assert plain.returncode != 0 and "export-size" not in plain.stdout
    for served in (origin, relay):
        assert "before STARTTLS (ERR_TLS_REQD)" in served.log.read_text()
    # A libnbd client with a certificate of another CA is refused.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(pki.ca, foreign / "ca-cert.pem")
    shutil.copy(pki.stranger.cert, foreign / "client-cert.pem")
    shutil.copy(pki.stranger.key, foreign / "client-key.pem")
    bad = run("nbdinfo", "--json", f"nbds://127.0.0.1:{p_relay}/disk?tls-certificates={foreign}",
              check=False)
    assert bad.returncode != 0
    assert relay.proc.poll() is None and origin.proc.poll() is None
    for served in (origin, relay, overlay):
        log = served.log.read_text()
        assert "eof_received" not in log and "Traceback" not in log, log


def _qemu_nbd_opts(port: int, export: str) -> str:
    return (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            f"export={export},tls-creds=tls0")


def test_qemu_img_over_tls_through_origin_relay_overlay(serve, pki: Pki, tmp_path: Path) -> None:
    require("qemu-img")
    data, img, _, _, (overlay, p_overlay) = _tls_chain(serve, pki, tmp_path)
    creds = f"tls-creds-x509,id=tls0,dir={pki.libnbd_dir},endpoint=client"
    info = json.loads(run("qemu-img", "info", "--output=json", "--object", creds,
                          "--image-opts", _qemu_nbd_opts(p_overlay, "vm")).stdout)
    assert info["virtual-size"] == len(data)
    out = run("qemu-img", "compare", "--object", creds, "--image-opts",
              f"driver=file,filename={img}", _qemu_nbd_opts(p_overlay, "vm")).stdout
    assert "Images are identical" in out
    # Without credentials QEMU cannot read the overlay.
    plain = run("qemu-img", "info", f"nbd://127.0.0.1:{p_overlay}/vm", check=False)
    assert plain.returncode != 0
    assert overlay.proc.poll() is None


def test_serve_needs_all_three_tls_files(pki: Pki, tmp_path: Path) -> None:
    import sys

    img = tmp_path / "d.img"
    make_image(img, MiB)
    files = pki.hosts["origin"]
    done = subprocess.run(
        [sys.executable, "-m", "virtman", "serve", str(img), "--socket", str(tmp_path / "s"),
         "--tls-cert", files.cert, "--tls-ca", files.ca],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert done.returncode == 2
    assert "missing --tls-key" in done.stderr
    assert not (tmp_path / "s").exists()


def test_tls_hostname_of_an_address() -> None:
    assert NbdAddress("d", host="10.0.0.1", tls=True).tls_hostname == "10.0.0.1"
    assert NbdAddress("d", socket="/s", tls=True).tls_hostname == "localhost"
