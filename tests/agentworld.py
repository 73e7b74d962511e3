"""An origin, Volt and agents in the test's own event loop, for the agent-part tests.

Everything is real (NBD server on loopback, Volt's and the agents' HTTP apps under
uvicorn, files in the test's tmp dir); only the processes are one. ``stop()`` ends
every server it started.

Credentials are on as in a real cluster: with ``tls`` (the default) Volt and the agents
serve HTTPS with certificates of the world's own CA and agents are known by them;
without, plain HTTP and agents use their tokens. ``operator`` is what tests call with.
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
from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.blockdev.file import FileDevice
from virtman.coordinator.app import create_app as volt_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.httpapi import ApiClient, Credentials, HttpService, bind, wait_for
from virtman.nbd.server import Export, NbdServer
from virtman.pki import init_ca, issue
from virtman.tlsconfig import TlsFiles

KiB = 1024
MiB = 1024 * KiB


class World:
    def __init__(
        self, tmp: Path, image_size: int = 4 * MiB, fanout: int | None = None, *, tls: bool = True
    ) -> None:
        self.tmp = tmp
        self.tls = tls
        self.pki = str(tmp / "pki")
        self.ca = init_ca(self.pki).cert if tls else None
        #: Shared by every service of the world: a token added later is known at once.
        self.tokens = TokenTable()
        self.authenticator = Authenticator(self.tokens, certificates=tls)
        self.operator = Credentials(token=self.token(Role.OPERATOR, "op"), ca=self.ca)
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
        #: Every HTTP app served, by service name ("volt", agent names): their routes.
        self.apps: dict[str, Any] = {}
        self._services: list[tuple[HttpService, asyncio.Task[None]]] = []
        self._by_agent: dict[str, tuple[HttpService, asyncio.Task[None]]] = {}

    def token(self, role: Role, name: str) -> str:
        """A new token for ``role`` ``name``, known to every service of the world."""
        token = new_token()
        self.tokens.add(Principal(role, name), token)
        return token

    def tls_files(self, name: str) -> TlsFiles | None:
        return issue(name, self.pki, self.pki) if self.tls else None

    def agent_credentials(self, name: str, tls: TlsFiles | None) -> Credentials:
        """What agent ``name`` presents: its certificate with TLS, else a token."""
        if tls is not None:
            return Credentials(tls=tls)
        return Credentials(token=self.token(Role.AGENT, name))

    def as_agent(self, name: str) -> Credentials:
        """Credentials of a new agent ``name`` (its own certificate, or token)."""
        return self.agent_credentials(name, self.tls_files(name))

    def api(self, url: str, **kwargs: Any) -> ApiClient:
        """A client with the operator's credentials."""
        return self.operator.api(url, **kwargs)

    async def pose_as_agent(self, name: str, url: str) -> None:
        """Register ``url`` with Volt as agent ``name`` (a stand-in of the test)."""
        stand_in = Credentials(token=self.token(Role.AGENT, name), ca=self.ca)
        async with stand_in.api(self.volt_url) as api:
            await api.post(f"/agents/{name}/heartbeat", json={"url": url, "relays": {}})

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
        self.apps["volt"] = volt_app(volt, authenticator=self.authenticator)
        self.volt_url = await self._serve(self.apps["volt"], self.tls_files("volt"))
        async with self.api(self.volt_url) as api:
            await api.post(
                "/images",
                json={"name": "img", "origins": [self.origin_uri], "chunk_size": 64 * KiB},
            )

    async def _serve(self, app: Any, tls: TlsFiles | None) -> str:
        service = HttpService(app, bind("127.0.0.1", 0), tls=tls)
        task = asyncio.get_running_loop().create_task(service.run())
        self._services.append((service, task))
        await wait_for(service.url, credentials=self.operator)
        return service.url

    async def agent(self, name: str, limits: CopyLimits | None = None, **kw: Any) -> Agent:
        tls = self.tls_files(name)
        agent = Agent(
            name,
            str(self.tmp / name),
            self.volt_url,
            socket_dir=f"{self.socket_root}/{name}",
            heartbeat_interval=0.3,
            copy_limits=limits,
            credentials=self.agent_credentials(name, tls),
            **kw,
        )
        self.apps[name] = agent_app(agent, authenticator=self.authenticator)
        service = HttpService(self.apps[name], bind("127.0.0.1", 0), tls=tls)
        agent.url = service.url
        task = asyncio.get_running_loop().create_task(service.run())
        self._services.append((service, task))
        self._by_agent[name] = (service, task)
        await wait_for(service.url, credentials=self.operator)
        await self._known_to_volt(name)
        self.agents[name] = agent
        return agent

    async def _known_to_volt(self, name: str, timeout: float = 10.0) -> None:
        """Wait for the agent's first heartbeat: others may send it VMs from then on."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with self.api(self.volt_url) as api:
            while name not in [a["name"] for a in await api.get("/agents")]:
                assert asyncio.get_running_loop().time() < deadline, f"{name} never beat"
                await asyncio.sleep(0.02)

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
