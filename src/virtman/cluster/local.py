"""A whole virtman cluster on one machine: origin, Volt and agents as real processes.

Used by ``virtman up`` and by the tests. Volt and every agent are separate processes
(so an agent can be SIGKILLed like a dead host, and Volt restarted); the origin is an
NBD server inside the calling process, so the bytes it sends can be counted exactly.
Everything listens on loopback or on Unix sockets in directories this cluster made;
``stop()`` ends every process it started, even after a failure or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from virtman.blockdev.file import FileDevice
from virtman.childprocess import ChildProcess
from virtman.errors import NetworkError
from virtman.httpapi import ApiClient, wait_for
from virtman.limits import (
    DEFAULT_CACHE_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    IMAGE_REGISTER_TIMEOUT_SECONDS,
    SERVICE_START_TIMEOUT_SECONDS,
    STATUS_TIMEOUT_SECONDS,
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
    VM_CREATE_TIMEOUT_SECONDS,
)
from virtman.nbd.server import Export, NbdServer

log = logging.getLogger(__name__)

_SERVING = re.compile(rb"serving on (http://\S+)")


def _option(flag: str, value: str | None) -> list[str]:
    return [flag, value] if value else []


class Placement:
    """Where each service runs: this machine's loopback (the default)."""

    def command_prefix(self, service: str) -> list[str]:
        """What to run a service's command under (e.g. ``ip netns exec NS``)."""
        return []

    def address(self, service: str) -> str:
        """The IP address a service listens on ("origin", "volt", "host1", ...)."""
        return "127.0.0.1"


@dataclass
class ClusterSettings:
    hosts: int = 8
    fanout: int = TREE_FANOUT
    parents: int = TREE_PARENTS_PER_NODE
    heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    cache_size: int = DEFAULT_CACHE_CAPACITY
    log_level: str = "info"
    #: Seconds a started Volt or agent has to say where it serves.
    start_timeout: float = SERVICE_START_TIMEOUT_SECONDS
    #: Delivery mode of every agent (a ``virtman.delivery.DeliveryMode`` value).
    mode: str = "virtman"
    #: PAPER mode: seconds per tree level to attach.
    attach_delay: float = 0.0
    #: Every agent's ``--accel`` (auto, kvm, tcg), and its ``--qemu`` and
    #: ``--accel-cache`` when set (else the agent's defaults).
    accel: str = "auto"
    qemu: str | None = None
    accel_cache: str | None = None


@dataclass
class Service:
    """A running virtman process and where it serves."""

    child: ChildProcess
    url: str = ""
    killed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def alive(self) -> bool:
        return self.child.alive


class LocalCluster:
    def __init__(
        self,
        workdir: str,
        settings: ClusterSettings | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.settings = settings or ClusterSettings()
        self.placement = placement or Placement()
        # Unix socket paths must stay short: keep them out of a deep work directory.
        self.socket_root = tempfile.mkdtemp(prefix="vm-")
        self.origin: NbdServer | None = None
        self.origin_device: FileDevice | None = None
        self.origin_uri = ""
        self.volt: Service | None = None
        self.volt_port = 0
        self.agents: dict[str, Service] = {}
        os.makedirs(self.workdir, exist_ok=True)

    # --- processes ------------------------------------------------------------------------------

    async def _spawn(self, name: str, args: list[str]) -> Service:
        argv = [
            *self.placement.command_prefix(name),
            sys.executable,
            "-m",
            "virtman",
            "--log-level",
            self.settings.log_level,
            *args,
        ]
        # A restart appends to the log; readiness reads this run's lines only.
        child = ChildProcess.start(name, argv, os.path.join(self.workdir, f"{name}.log"),
                                   append=True)
        match = await child.wait_ready_async(lambda: child.search(_SERVING),
                                             self.settings.start_timeout)
        service = Service(child, url=match.group(1).decode())
        try:
            await wait_for(service.url)
        except BaseException:
            await asyncio.to_thread(child.stop)  # started but never ready: not to outlive us
            raise
        return service

    # --- origin -----------------------------------------------------------------------------------

    async def start_origin(self, image_path: str, export: str = "image") -> str:
        self.origin_device = FileDevice(image_path, read_only=True)
        await self.origin_device.open()
        self.origin = NbdServer([Export(export, self.origin_device, "virtman origin")])
        host = self.placement.address("origin")
        port = await self.origin.listen_tcp(host, 0)
        self.origin_uri = f"nbd://{host}:{port}/{export}"
        return self.origin_uri

    @property
    def origin_bytes_sent(self) -> int:
        return self.origin.stats.bytes_read if self.origin else 0

    # --- Volt -------------------------------------------------------------------------------------

    @property
    def volt_url(self) -> str:
        return f"http://{self.placement.address('volt')}:{self.volt_port}"

    async def start_volt(self) -> Service:
        s = self.settings
        self.volt = await self._spawn(
            "volt",
            [
                "volt",
                "--listen",
                f"{self.placement.address('volt')}:{self.volt_port}",
                "--db",
                os.path.join(self.workdir, "volt.db"),
                "--fanout",
                str(s.fanout),
                "--parents",
                str(s.parents),
                "--heartbeat-interval",
                str(s.heartbeat_interval),
                "--heartbeat-timeout",
                str(s.heartbeat_timeout),
            ],
        )
        self.volt_port = int(self.volt.url.rsplit(":", 1)[1])
        return self.volt

    def kill_volt(self) -> None:
        if self.volt is not None:
            self.volt.child.kill()
            self.volt.killed = True

    # --- agents -----------------------------------------------------------------------------------

    def host_names(self) -> list[str]:
        return [f"host{i + 1}" for i in range(self.settings.hosts)]

    async def start_agent(self, name: str) -> Service:
        previous = self.agents.get(name)
        listen = f"{self.placement.address(name)}:0"
        nbd_listen = listen
        if previous is not None:  # a restart keeps the addresses it had
            listen = previous.url.removeprefix("http://")
            nbd_listen = previous.extra.get("nbd", nbd_listen)
        socket_dir = os.path.join(self.socket_root, name)
        service = await self._spawn(
            name,
            [
                "agent",
                "--volt",
                self.volt_url,
                "--name",
                name,
                "--listen",
                listen,
                "--nbd-listen",
                nbd_listen,
                "--data-dir",
                os.path.join(self.workdir, name),
                "--socket-dir",
                socket_dir,
                "--cache-size",
                str(self.settings.cache_size),
                "--mode",
                self.settings.mode,
                "--attach-delay",
                str(self.settings.attach_delay),
                "--accel",
                self.settings.accel,
                *_option("--qemu", self.settings.qemu),
                *_option("--accel-cache", self.settings.accel_cache),
            ],
        )
        async with ApiClient(service.url) as api:
            status = await api.get("/status")
        service.extra["nbd"] = status["relay_nbd"]
        self.agents[name] = service
        return service

    async def start_agents(self) -> None:
        await asyncio.gather(*(self.start_agent(n) for n in self.host_names()))

    def kill_agent(self, name: str) -> None:
        agent = self.agents[name]
        agent.child.kill()
        agent.killed = True
        log.info("killed agent %s (SIGKILL)", name)

    async def stop_agent(self, name: str) -> int:
        return await asyncio.to_thread(self.agents[name].child.stop)

    # --- API helpers ------------------------------------------------------------------------------

    async def register_image(self, name: str, origins: list[str] | None = None) -> Any:
        async with ApiClient(self.volt_url, timeout=IMAGE_REGISTER_TIMEOUT_SECONDS) as api:
            return await api.post(
                "/images",
                json={
                    "name": name,
                    "origins": origins or [self.origin_uri],
                    "chunk_size": self.settings.chunk_size,
                },
            )

    async def create_vm(
        self, host: str, name: str, image: str, timeout: float = VM_CREATE_TIMEOUT_SECONDS
    ) -> str:
        # Creating the first VM of an image may download it whole (COPY mode).
        async with ApiClient(self.agents[host].url, timeout=timeout) as api:
            doc = await api.post("/vms", json={"name": name, "image": image})
        return str(doc["uri"])

    async def tree(self, image: str) -> Any:
        async with ApiClient(self.volt_url) as api:
            return await api.get(f"/images/{image}/tree")

    async def agent_status(self, host: str) -> Any:
        agent = self.agents[host]
        if not agent.alive:
            return None
        try:
            async with ApiClient(agent.url, timeout=STATUS_TIMEOUT_SECONDS) as api:
                return await api.get("/status")
        except NetworkError:
            return None

    # --- teardown ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        children = [a.child for a in self.agents.values()]
        if self.volt is not None:
            children.append(self.volt.child)
        await asyncio.gather(*(asyncio.to_thread(c.stop) for c in children))
        if self.origin is not None:
            await self.origin.stop()
        if self.origin_device is not None:
            await self.origin_device.close()
        shutil.rmtree(self.socket_root, ignore_errors=True)

