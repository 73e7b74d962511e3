"""The compute agent (VirtMan Compute): a composition of three parts.

- ``RelayManager`` (``relays.py``): the image relays, their NBD server, the cache group.
- ``VmManager`` (``vm_manager.py``): the VMs, their guests, both ends of clone/migrate.
- ``VoltLink`` (``voltlink.py``): heartbeats, image records, joining and leaving trees.

The HTTP API (``app.py``) calls the parts through this class; the parts know only what
they are given: the VMs know the relays, the relays know an image directory (the link),
and the link knows two callbacks. Nothing here reaches inside a part.

Lifecycle: ``CREATED → STARTING → RUNNING → STOPPING → STOPPED``. ``start()`` starts the
relays (listen, reopen every image in the data directory), then the VMs (remove
unfinished imports, reopen every VM: VMs, snapshots and cache survive a restart), then
the heartbeats. ``stop()`` undoes it in reverse: heartbeats, VMs (requests in flight
finish, overlays flush), relays. A part that fails to start stops the ones before it.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from typing import Any

from virtman.agent.copy import CopyLimits
from virtman.agent.images import DeliveryMode
from virtman.agent.relays import RelayManager
from virtman.agent.vm_manager import VmManager
from virtman.agent.voltlink import VoltLink
from virtman.coordinator.models import HeartbeatReply
from virtman.errors import Conflict, LocalProtocolError
from virtman.hypervisor.qemu import HypervisorSettings
from virtman.limits import DEFAULT_CACHE_CAPACITY, HEARTBEAT_INTERVAL_SECONDS
from virtman.planner.tree import ORIGIN

log = logging.getLogger(__name__)


class AgentState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    def __init__(
        self,
        name: str,
        data_dir: str,
        volt_url: str,
        *,
        nbd_host: str = "127.0.0.1",
        nbd_port: int = 0,
        socket_dir: str | None = None,
        cache_capacity: int = DEFAULT_CACHE_CAPACITY,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
        mode: DeliveryMode = DeliveryMode.VIRTMAN,
        attach_delay: float = 0.0,
        copy_limits: CopyLimits | None = None,
        hypervisor: HypervisorSettings | None = None,
    ) -> None:
        self.name = name
        self.data_dir = os.path.abspath(data_dir)
        self.state = AgentState.CREATED
        self.link = VoltLink(
            name,
            volt_url,
            report=self._heartbeat_report,
            on_reply=self._heartbeat_reply,
            interval=heartbeat_interval,
        )
        self.relays = RelayManager(
            os.path.join(self.data_dir, "cache"),
            self.link,
            capacity=cache_capacity,
            nbd_host=nbd_host,
            nbd_port=nbd_port,
            mode=mode,
            attach_delay=attach_delay,
        )
        self.vms = VmManager(
            name,
            self.data_dir,
            os.path.abspath(socket_dir or os.path.join(self.data_dir, "sock")),
            self.relays,
            copy_limits=copy_limits,
            hypervisor=hypervisor,
        )

    @property
    def url(self) -> str:
        """This agent's HTTP URL (set by the HTTP front once it listens)."""
        return self.link.url

    @url.setter
    def url(self, value: str) -> None:
        self.link.url = value

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not AgentState.CREATED:
            raise LocalProtocolError(f"agent {self.name!r} started while {self.state.value}")
        self.state = AgentState.STARTING
        try:
            await self.relays.start()
            await self.vms.start()
        except BaseException:
            await self._stop_parts()
            self.state = AgentState.STOPPED
            raise
        self.link.start()
        self.state = AgentState.RUNNING
        log.info(
            "agent %r running: %d images, %d VMs, relays on %s:%d",
            self.name,
            len(self.relays.relays),
            len(self.vms.vms),
            self.relays.nbd_host,
            self.relays.nbd_port,
        )

    async def stop(self) -> None:
        if self.state in (AgentState.STOPPING, AgentState.STOPPED):
            return
        self.state = AgentState.STOPPING
        await self._stop_parts()
        self.state = AgentState.STOPPED
        log.info("agent %r stopped", self.name)

    async def _stop_parts(self) -> None:
        await self.link.stop()
        await self.vms.stop()
        await self.relays.stop()

    # --- heartbeats -----------------------------------------------------------------------

    def _heartbeat_report(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "relays": self.relays.in_tree(),
            "stats": self._heartbeat_stats(),
        }

    def _heartbeat_stats(self) -> dict[str, Any]:
        """A few numbers for Volt's live view: VMs by phase, and per image the bytes
        fetched from the origin and from parents (a handful of integers per image)."""
        phases: dict[str, int] = {}
        for vm in self.vms.vms.values():
            phase = vm.phase()
            phases[phase] = phases.get(phase, 0) + 1
        images: dict[str, dict[str, int]] = {}
        for name, relay in self.relays.relays.items():
            received = relay.bytes_received()
            from_origin = received.get(ORIGIN, 0)
            images[name] = {
                "from_origin": from_origin,
                "from_parents": sum(received.values()) - from_origin,
            }
        return {"vms": len(self.vms.vms), "vm_phases": phases, "images": images}

    async def _heartbeat_reply(self, reply: HeartbeatReply) -> None:
        self.relays.apply(reply.paths)
        await self.relays.evict()

    # --- clone and migrate ----------------------------------------------------------------

    async def copy_vm(self, name: str, destination: str, *, move: bool) -> dict[str, Any]:
        """Send a VM to another agent (by name, through Volt, or by URL)."""
        self.vms.get(name)  # an unknown VM is reported before the destination is looked up
        if destination.startswith(("http://", "https://")):
            url = destination
        else:
            url = await self.link.agent_url(destination)
        if url.rstrip("/") == self.url.rstrip("/"):
            raise Conflict(f"VM {name!r} is already on agent {self.name!r}")
        return await self.vms.copy_out(name, url.rstrip("/"), move=move)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        relays = self.relays.status()
        return {
            "name": self.name,
            "state": self.state.value,
            "volt_reachable": self.link.reachable,
            "heartbeat": self.link.status(),
            "relay_nbd": relays["relay_nbd"],
            "mode": relays["mode"],
            "relay_bytes_sent": relays["relay_bytes_sent"],
            # CPU this agent process has used (all threads): what serving costs a host.
            "cpu_seconds": round(time.process_time(), 3),
            "cache": relays["cache"],
            "images": relays["images"],
            "vms": [vm.info() for vm in self.vms.list()],
        }
