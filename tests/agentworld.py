"""An origin, Volt and agents in the test's own event loop, for the agent-part tests.

Everything is real (NBD server on loopback, Volt's and the agents' HTTP apps under
uvicorn, files in the test's tmp dir); only the processes are one. ``stop()`` ends
every server it started.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from virtman.agent.agent import Agent
from virtman.agent.app import create_app as agent_app
from virtman.agent.copy import CopyLimits
from virtman.blockdev.file import FileDevice
from virtman.coordinator.app import create_app as volt_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.httpapi import ApiClient, HttpService, bind, wait_for
from virtman.nbd.server import Export, NbdServer

KiB = 1024
MiB = 1024 * KiB


class World:
    def __init__(self, tmp: Path, image_size: int = 4 * MiB, fanout: int | None = None) -> None:
        self.tmp = tmp
        self.image_size = image_size
        #: Volt's tree fan-out (None: its default); 1 makes every new host a child of
        #: the one before.
        self.fanout = fanout
        self.image = random.Random(7).randbytes(image_size)
        self.socket_root = tempfile.mkdtemp(prefix="vm-")  # short: socket paths are capped
        self.origin: NbdServer | None = None
        self.origin_uri = ""
        self.volt_url = ""
        self.agents: dict[str, Agent] = {}
        self._services: list[tuple[HttpService, asyncio.Task[None]]] = []
        self._by_agent: dict[str, tuple[HttpService, asyncio.Task[None]]] = {}

    async def start(self) -> None:
        path = self.tmp / "image.raw"
        path.write_bytes(self.image)
        device = FileDevice(str(path), read_only=True)
        await device.open()
        self.origin = NbdServer([Export("image", device)])
        port = await self.origin.listen_tcp("127.0.0.1", 0)
        self.origin_uri = f"nbd://127.0.0.1:{port}/image"
        tree: dict[str, int] = {} if self.fanout is None else {"fanout": self.fanout}
        volt = Volt(VoltState(str(self.tmp / "volt.db")), interval=0.3, timeout=1.2, **tree)
        self.volt_url = await self._serve(volt_app(volt))
        async with ApiClient(self.volt_url) as api:
            await api.post(
                "/images",
                json={"name": "img", "origins": [self.origin_uri], "chunk_size": 64 * KiB},
            )

    async def _serve(self, app: Any) -> str:
        service = HttpService(app, bind("127.0.0.1", 0))
        task = asyncio.get_running_loop().create_task(service.run())
        self._services.append((service, task))
        await wait_for(service.url)
        return service.url

    async def agent(self, name: str, limits: CopyLimits | None = None, **kw: Any) -> Agent:
        agent = Agent(
            name,
            str(self.tmp / name),
            self.volt_url,
            socket_dir=f"{self.socket_root}/{name}",
            heartbeat_interval=0.3,
            copy_limits=limits,
            **kw,
        )
        service = HttpService(agent_app(agent), bind("127.0.0.1", 0))
        agent.url = service.url
        task = asyncio.get_running_loop().create_task(service.run())
        self._services.append((service, task))
        self._by_agent[name] = (service, task)
        await wait_for(service.url)
        self.agents[name] = agent
        return agent

    async def stop_agent(self, name: str) -> None:
        """Stop one agent cleanly (its HTTP service, then the agent: lifespan)."""
        service, task = self._by_agent.pop(name)
        self._services.remove((service, task))
        service.stop()
        await asyncio.wait_for(task, 20)
        del self.agents[name]

    async def stop(self) -> None:
        for service, task in reversed(self._services):
            service.stop()
            await asyncio.wait_for(task, 20)
        if self.origin is not None:
            await self.origin.stop()
        shutil.rmtree(self.socket_root, ignore_errors=True)
