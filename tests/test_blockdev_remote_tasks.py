"""RemoteDevice's background tasks (reconnects, new paths, draining retired paths) are
held by the device and gone once it is closed: nothing is left running unowned."""

from __future__ import annotations

import asyncio
from pathlib import Path

from devices import image_bytes

from virtman.blockdev import FaultyDevice, MemoryDevice, RemoteDevice
from virtman.nbd.server import NbdServer

SIZE = 256 * 1024


def _device_tasks() -> set[str]:
    """Names of the RemoteDevice coroutines running in tasks (not the servers' tasks)."""
    return {
        name
        for t in asyncio.all_tasks()
        if not t.done() and (name := t.get_coro().__qualname__).startswith("RemoteDevice.")
    }


async def test_close_leaves_no_background_task_running(tmp_path: Path) -> None:
    data = image_bytes(SIZE)
    slow = FaultyDevice(MemoryDevice(data=data, read_only=True))
    fast = FaultyDevice(MemoryDevice(data=data, read_only=True))
    servers = []
    for name, device in (("a", slow), ("b", fast)):
        await device.open()
        server = NbdServer({"img": device})
        await server.listen_unix(str(tmp_path / f"{name}.sock"))
        servers.append(server)
    uri = {n: f"nbd+unix:///img?socket={tmp_path / n}.sock" for n in ("a", "b")}
    dead = f"nbd+unix:///img?socket={tmp_path}/dead.sock"

    dev = RemoteDevice([uri["a"], dead], reconnect_delay=0.05, retire_grace=30.0)
    await dev.open()  # "dead" is down: a reconnect task runs for it
    slow.delay = 30.0
    inflight = asyncio.ensure_future(dev.read(0, 4096))
    await asyncio.sleep(0.1)
    # "a" is retired with a read on it: its drain waits out the 30 s grace; "dead" is
    # dropped, a new dead path starts connecting in the background.
    dev.set_paths([uri["b"], f"nbd+unix:///img?socket={tmp_path}/dead2.sock"])
    await asyncio.sleep(0.1)
    running = _device_tasks()
    assert "RemoteDevice._drain_retired" in running, running
    await dev.close()
    # The read in flight moved to "b" when the retired connection was dropped, or failed.
    await asyncio.gather(inflight, return_exceptions=True)
    assert _device_tasks() == set()

    servers[0].shutdown_grace = 0
    for server in servers:
        await server.stop()
