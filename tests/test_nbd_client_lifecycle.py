"""NbdClient's lifecycle states, and the errors it raises, against real sockets.

Every timeout reaches the caller as ``NetworkTimeout`` (a ``VirtmanError``) that names
the address, the operation and the limit, never as a bare ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtman.blockdev import FaultyDevice, MemoryDevice
from virtman.errors import NetworkError, NetworkTimeout, VirtmanError
from virtman.nbd.client import ClientStatus, NbdClient, list_exports
from virtman.nbd.server import NbdServer

SIZE = 64 * 1024


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[NbdServer, FaultyDevice, str]]:
    device = FaultyDevice(MemoryDevice(data=bytes(range(256)) * (SIZE // 256), read_only=True))
    await device.open()
    server = NbdServer({"img": device})
    sock = tmp_path / "s.sock"
    await server.listen_unix(str(sock))
    yield server, device, f"nbd+unix:///img?socket={sock}"
    await server.stop()


async def test_states_from_ready_to_closed(served) -> None:
    _, _, uri = served
    client = await NbdClient.connect(uri)
    assert client.status is ClientStatus.READY and not client.closed
    assert await client.read(0, 4) == b"\x00\x01\x02\x03"
    closing = asyncio.ensure_future(client.close())
    await asyncio.sleep(0)
    assert client.status is ClientStatus.CLOSING
    await closing
    assert client.status is ClientStatus.CLOSED and client.closed
    with pytest.raises(NetworkError, match="closed"):
        await client.read(0, 4)


async def test_a_server_going_away_closes_the_client(served) -> None:
    server, _, uri = served
    client = await NbdClient.connect(uri)
    await server.stop()
    for _ in range(100):
        if client.closed:
            break
        await asyncio.sleep(0.01)
    assert client.status is ClientStatus.CLOSED
    assert isinstance(client.error, NetworkError)
    with pytest.raises(NetworkError):
        await client.read(0, 4)
    await client.close()


async def test_request_timeout_is_a_network_timeout_with_facts(served) -> None:
    _, device, uri = served
    client = await NbdClient.connect(uri)
    client.request_timeout = 0.1
    device.delay = 1.0
    with pytest.raises(NetworkTimeout) as caught:
        await client.read(4096, 512)
    err = caught.value
    assert isinstance(err, VirtmanError) and isinstance(err, NetworkError)
    assert not isinstance(err, TimeoutError)
    assert err.what == "READ offset=4096 length=512"
    assert err.limit == 0.1
    assert err.address is not None and "s.sock" in err.address
    assert client.status is ClientStatus.READY  # the connection itself is still fine
    device.delay = 0.0
    assert await client.read(0, 2) == b"\x00\x01"
    client.abort()
    assert client.status is ClientStatus.CLOSED


async def _silent_listener(path: Path) -> asyncio.AbstractServer:
    """Accepts and never says a word (a hung or hostile server)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    return await asyncio.start_unix_server(hold, str(path))


@pytest.mark.parametrize("listing", [False, True], ids=["connect", "list_exports"])
async def test_handshake_timeout_is_a_network_timeout(tmp_path: Path, listing: bool) -> None:
    sock = tmp_path / "silent.sock"
    listener = await _silent_listener(sock)
    uri = f"nbd+unix:///img?socket={sock}"
    try:
        with pytest.raises(NetworkTimeout) as caught:
            if listing:
                await list_exports(uri, timeout=0.2)
            else:
                await NbdClient.connect(uri, timeout=0.2)
        assert caught.value.what == "handshake"
        assert caught.value.limit == 0.2
        assert "handshake timed out after 0.2 s" in str(caught.value)
    finally:
        listener.close()


async def test_connect_to_nothing_is_a_network_error(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="cannot connect"):
        await NbdClient.connect(f"nbd+unix:///img?socket={tmp_path}/none.sock", timeout=0.5)


async def test_a_host_name_the_resolver_refuses_is_a_bounded_network_error() -> None:
    # A 100 kB DNS label makes the resolver's IDNA codec raise UnicodeError, not OSError.
    host = "a" * 100_000
    with pytest.raises(NetworkError) as caught:
        await NbdClient.connect(f"nbd://{host}:10809/img")
    assert "host name refused" in str(caught.value)
    assert len(str(caught.value)) < 1000
