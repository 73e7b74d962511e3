"""The NBD server's limits on its clients, with real sockets on loopback.

- a connection over ``max_connections`` is closed before the greeting, logged (rate
  limited), and clients already connected go on being served;
- the default limit follows the descriptor limit (a server under ``ulimit -n 128``);
- the servers of one process share one budget: together they never hold more;
- idle connections are closed after ``idle_timeout`` only while the server is crowded;
- a client that never finishes the handshake is still cut (slowloris);
- 10,000 refused writes cost a bounded number of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_image

from virtman.blockdev import FaultyDevice, MemoryDevice
from virtman.errors import ConfigError, NetworkError
from virtman.nbd.budget import ConnectionBudget, default_max_connections
from virtman.nbd.client import NbdClient
from virtman.nbd.server import NbdServer
from virtman.protocol.nbd.constants import (
    IHAVEOPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    Errno,
    Option,
    Reply,
)

SIZE = 256 * 1024
DATA = bytes(range(256)) * (SIZE // 256)


async def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


@pytest.fixture
async def device() -> AsyncIterator[FaultyDevice]:
    dev = FaultyDevice(MemoryDevice(data=DATA, read_only=True))
    await dev.open()
    yield dev
    await dev.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[NbdServer]]:
    started: list[NbdServer] = []
    yield started
    for server in started:
        await server.stop()


def _log_lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


# --- the connection limit -------------------------------------------------------------------


async def test_connections_over_the_limit_are_refused_while_a_good_client_is_served(
    device, servers, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="virtman.nbd.server")
    server = NbdServer({"img": device}, max_connections=4, idle_timeout=None)
    servers.append(server)
    port = await server.listen_tcp("127.0.0.1", 0)
    uri = f"nbd://127.0.0.1:{port}/img"
    good = await NbdClient.connect(uri)
    idle = [await NbdClient.connect(uri) for _ in range(3)]
    assert server.open_connections == 4

    for i in range(20):
        with pytest.raises(NetworkError):
            await NbdClient.connect(uri, timeout=5)
        # The good client is served throughout.
        offset = (i * 4096) % SIZE
        assert await good.read(offset, 4096) == DATA[offset : offset + 4096]

    # Refused before the handshake: not even the greeting is sent.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(64), 5) == b""
    except ConnectionResetError:
        pass
    writer.close()

    assert server.stats.connections_refused == 21
    assert server.open_connections == 4
    refused = _log_lines(caplog, "connections: refused")
    assert len(refused) == 1, refused  # the other 20 are counted, not logged
    assert "at its limit of 4 connections: refused 127.0.0.1:" in refused[0]

    # A slot that frees up is taken by the next client.
    await idle[0].close()
    assert await _eventually(lambda: server.open_connections == 3)
    late = await NbdClient.connect(uri)
    assert await late.read(0, 16) == DATA[:16]

    await server.stop()
    summary = _log_lines(caplog, "more like this (connection over the limit from 127.0.0.1)")
    assert summary and summary[0].startswith("20 more like this"), summary
    for client in [good, late, *idle[1:]]:
        await client.close()


def test_default_limit_follows_the_descriptor_limit() -> None:
    assert default_max_connections(1024) == 480
    assert default_max_connections(128) == 32
    assert default_max_connections(10) == 1
    assert default_max_connections(1 << 40) < 1 << 40  # an unlimited process is still capped


async def test_servers_of_one_process_share_one_budget(device, tmp_path: Path, caplog) -> None:
    """Two servers, each allowed the whole budget of 3, hold 3 connections together: a
    relay server full of idle clients leaves the process its descriptors, and once it is
    crowded its idle clients make room for a VM's QEMU on another server."""
    caplog.set_level(logging.INFO, logger="virtman.nbd.server")
    budget = ConnectionBudget(3)
    relay = NbdServer({"img": device}, budget=budget, idle_timeout=0.2)
    vm = NbdServer({"img": device}, budget=budget, idle_timeout=None)
    assert relay.max_connections == vm.max_connections == 3
    try:
        await relay.listen_unix(str(tmp_path / "relay.sock"))
        await vm.listen_unix(str(tmp_path / "vm.sock"))
        relay_uri = f"nbd+unix:///img?socket={tmp_path}/relay.sock"
        vm_uri = f"nbd+unix:///img?socket={tmp_path}/vm.sock"
        busy = await NbdClient.connect(relay_uri)
        idle = [await NbdClient.connect(relay_uri) for _ in range(2)]
        assert budget.held == 3 and relay.open_connections == 3
        # The relay server alone is at 3 of its 3, so the check is on its own limit;
        # the VM server is empty, so only the shared budget can refuse this one.
        with pytest.raises(NetworkError):
            await NbdClient.connect(vm_uri, timeout=5)
        assert vm.stats.connections_refused == 1
        assert _log_lines(caplog, "at their limit of 3 connections together: refused")
        # The process is crowded (3 of 3), so the relay's idle clients are closed...
        while budget.held >= 2:  # (the busy one keeps reading)
            assert await busy.read(0, 512) == DATA[:512]
            await asyncio.sleep(0.05)
        assert not busy.closed and any(c.closed for c in idle)
        # ...and the VM's client gets in.
        qemu = await NbdClient.connect(vm_uri)
        assert await qemu.read(4096, 4096) == DATA[4096:8192]
        assert budget.held == relay.open_connections + vm.open_connections
        for client in [busy, qemu, *idle]:
            client.abort()
    finally:
        await relay.stop()
        await vm.stop()
    assert budget.held == 0  # every slot given back, once


def test_a_budget_that_admits_no_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="budget of 0 admits no client"):
        ConnectionBudget(0)


async def _read_log(path: Path, fragment: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if fragment in text:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{fragment!r} not in the log: {path.read_text()}")


async def test_a_server_under_ulimit_128_keeps_descriptors_and_recovers(tmp_path: Path) -> None:
    """The issue's probe, scaled down: idle clients past the handshake fill the server.

    Under ``ulimit -n 128`` the derived limit is 32. Extra clients are refused with a log
    line, the process keeps descriptors to spare, the good client is served, and once idle
    connections have been closed (while the server is crowded) new clients get in again.
    """
    image = tmp_path / "disk.img"
    data = make_image(image, SIZE)
    sock = tmp_path / "s.sock"
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "virtman", "serve", str(image), "--read-only",
           "--socket", str(sock), "--export", "disk", "--idle-timeout", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", "ulimit -n 128 && exec " + shlex.join(cmd)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    clients: list[NbdClient] = []
    try:
        text = await _read_log(log, "serving")
        assert "at most 32 connections" in text
        uri = f"nbd+unix:///disk?socket={sock}"
        good = await NbdClient.connect(uri)
        clients.append(good)
        refused = 0
        for _ in range(40):
            try:
                clients.append(await NbdClient.connect(uri, timeout=5))
            except NetworkError:
                refused += 1
        assert (len(clients), refused) == (32, 9)
        assert await good.read(1000, 5000) == data[1000:6000]
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < 100, f"{fds} descriptors open under a limit of 128"
        text = await _read_log(log, "at its limit of 32 connections: refused unix pid=")
        assert text.count("connections: refused") == 1

        # After about 1 s idle connections are closed, until fewer than half of the 32
        # slots are taken (the server has room again); the good client stays busy.
        async def room_again() -> None:
            while sum(not c.closed for c in clients) >= 16:
                assert await good.read(0, 512) == data[:512]
                await asyncio.sleep(0.1)

        await asyncio.wait_for(room_again(), 10)
        assert not good.closed
        newcomer = await NbdClient.connect(uri)
        clients.append(newcomer)
        assert await newcomer.read(4096, 4096) == data[4096:8192]
        text = await _read_log(log, "sent no request for 1 s")
        assert text.count("sent no request") <= 2  # one line, then one summary at most
    finally:
        for client in clients:
            client.abort()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()


# --- the idle timeout -----------------------------------------------------------------------


async def test_idle_connections_are_closed_once_the_server_is_crowded(
    device, servers, tmp_path: Path
) -> None:
    # Crowded from 2 of 4 connections (the default fraction, one half).
    server = NbdServer({"img": device}, max_connections=4, idle_timeout=0.1)
    servers.append(server)
    await server.listen_unix(str(tmp_path / "s.sock"))
    uri = f"nbd+unix:///img?socket={tmp_path}/s.sock"

    lone = await NbdClient.connect(uri)
    await asyncio.sleep(0.5)  # five idle timeouts, but the server has room: kept (QEMU)
    assert not lone.closed and server.stats.idle_closed == 0
    assert await lone.read(0, 8) == DATA[:8]

    second = await NbdClient.connect(uri)  # now 2 of 4: crowded
    assert await _eventually(lambda: lone.closed)  # idle the longest: closed first
    assert server.stats.idle_closed == 1 and server.open_connections == 1
    await asyncio.sleep(0.5)  # 1 of 4 again: the newcomer, idle as long, is kept
    assert not second.closed and server.stats.idle_closed == 1
    third = await NbdClient.connect(uri)
    assert await _eventually(lambda: second.closed)
    assert not third.closed and server.stats.idle_closed == 2
    await third.close()


async def test_a_request_in_flight_is_not_idle(device, servers, tmp_path: Path) -> None:
    server = NbdServer({"img": device}, max_connections=2, idle_timeout=0.2)
    servers.append(server)
    await server.listen_unix(str(tmp_path / "s.sock"))
    client = await NbdClient.connect(f"nbd+unix:///img?socket={tmp_path}/s.sock")
    device.delay = 0.7  # longer than the idle timeout, with the server crowded
    assert await client.read(512, 512) == DATA[512:1024]
    assert not client.closed and server.stats.idle_closed == 0
    assert await _eventually(lambda: client.closed)
    assert server.stats.idle_closed == 1


# --- the handshake timeout (slowloris) ------------------------------------------------------


async def test_clients_that_never_finish_the_handshake_are_cut(
    device, servers, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="virtman.nbd.server")
    server = NbdServer({"img": device}, handshake_timeout=0.3, max_connections=20)
    servers.append(server)
    await server.listen_unix(str(tmp_path / "s.sock"))
    slow = [await asyncio.open_unix_connection(str(tmp_path / "s.sock")) for _ in range(10)]
    good = await NbdClient.connect(f"nbd+unix:///img?socket={tmp_path}/s.sock")
    for reader, _ in slow:
        await asyncio.wait_for(reader.read(), 5)  # greeting, then EOF when cut
    assert server.stats.handshake_timeouts == 10
    assert await good.read(0, 4096) == DATA[:4096]
    assert len(_log_lines(caplog, "did not finish the handshake")) == 1
    for _, writer in slow:
        writer.close()
    await good.close()


# --- log volume -----------------------------------------------------------------------------


def _handshake(sock: socket.socket, export: bytes) -> None:
    def recv_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "server closed during the handshake"
            buf += chunk
        return buf

    recv_exact(18)
    sock.sendall(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    body = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, Option.GO, len(body)) + body)
    while True:
        _, _, reply, length = struct.unpack(">QIII", recv_exact(20))
        recv_exact(length)
        if reply == Reply.ACK:
            return
        assert reply == Reply.INFO, hex(reply)


def test_ten_thousand_refused_writes_log_a_bounded_number_of_bytes(serve, tmp_path) -> None:
    """Each refused WRITE used to log one 125-byte line: 4.5x the 28 bytes received.

    Run with ``-s`` to see the figures (quoted in docs/data-plane.md).
    """
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    served = serve("serve", str(image), "--read-only", export="disk")
    before = served.log.stat().st_size
    count, payload = 10_000, 0
    requests = b"".join(
        struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.WRITE, cookie, 0, payload)
        for cookie in range(1, count + 1)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(served.socket))
        _handshake(sock, b"disk")
        sender = threading.Thread(target=sock.sendall, args=(requests,))
        sender.start()
        replies = b""
        while len(replies) < 16 * count:
            chunk = sock.recv(1 << 20)
            assert chunk, "server closed the connection"
            replies += chunk
        sender.join()
    for i in range(count):
        magic, errno, cookie = struct.unpack_from(">IIQ", replies, 16 * i)
        assert (magic, errno, cookie) == (SIMPLE_REPLY_MAGIC, Errno.EPERM, i + 1)
    assert served.stop() == 0
    text = served.log.read_bytes()[before:].decode()
    refused = [line for line in text.splitlines() if "refused WRITE" in line]
    grown = len(text.encode())
    ratio = grown / len(requests)
    print(f"\n{count} refused WRITEs, {len(requests)} bytes received: log grew {grown} bytes "
          f"in {len(refused)} lines, {ratio:.4f}x the bytes received")
    assert len(refused) == 2, refused  # the first, and the count of the rest at stop
    assert f"{count - 1} more like this (refused WRITE from unix uid=" in refused[1]
    assert ratio < 0.01
