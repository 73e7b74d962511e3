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

from virtman.agent.bakes import BakeManager
from virtman.agent.copy import CopyLimits
from virtman.agent.images import DeliveryMode
from virtman.agent.relays import ProfileSettings, RelayManager
from virtman.agent.vm_manager import VmManager
from virtman.agent.vms import SocketOwner, Vm, VmState
from virtman.agent.voltlink import VoltLink
from virtman.coordinator.models import HeartbeatReply
from virtman.errors import Conflict, Forbidden, LocalProtocolError
from virtman.httpapi import Credentials
from virtman.hypervisor.qemu import GuestState, HypervisorSettings
from virtman.limits import DEFAULT_CACHE_CAPACITY, HEARTBEAT_INTERVAL_SECONDS
from virtman.metrics import (
    BOOT_BUCKETS,
    CREATE_BUCKETS,
    Metric,
    Metrics,
    counter,
    data_path_families,
    fetch_histogram,
    gauge,
    nbd_families,
)
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
        credentials: Credentials | None = None,
        socket_owner: SocketOwner | None = None,
        profiles: ProfileSettings | None = None,
    ) -> None:
        self.name = name
        #: What this agent presents to Volt and to the agents it sends VMs to: its
        #: certificate (``tls``) and/or its agent token.
        self.credentials = credentials or Credentials()
        self.data_dir = os.path.abspath(data_dir)
        self.state = AgentState.CREATED
        #: This agent's Prometheus metrics (``GET /metrics``), in a registry of its own.
        self.metrics = Metrics()
        fetches = fetch_histogram(self.metrics)
        creates = self.metrics.histogram(
            "vm_create_seconds", "Time from a VM create request to its disk export serving "
            "(a first create of an image also sets up its relay and joins its tree).",
            CREATE_BUCKETS)
        boots = self.metrics.histogram(
            "vm_boot_seconds", "Time from a guest's QEMU start to its first console output "
            "(a KVM trial and a TCG restart included).", BOOT_BUCKETS)
        self.link = VoltLink(
            name,
            volt_url,
            report=self._heartbeat_report,
            on_reply=self._heartbeat_reply,
            interval=heartbeat_interval,
            credentials=self.credentials,
        )
        self.relays = RelayManager(
            os.path.join(self.data_dir, "cache"),
            self.link,
            capacity=cache_capacity,
            nbd_host=nbd_host,
            nbd_port=nbd_port,
            mode=mode,
            attach_delay=attach_delay,
            on_fetch=fetches.observe,
            tls=self.credentials.tls,  # relay exports and upstream reads: mutual TLS
            profiles=profiles,
        )
        self.vms = VmManager(
            name,
            self.data_dir,
            os.path.abspath(socket_dir or os.path.join(self.data_dir, "sock")),
            self.relays,
            copy_limits=copy_limits,
            hypervisor=hypervisor,
            credentials=self.credentials,
            socket_owner=socket_owner,
            on_created=creates.observe,
            on_booted=boots.observe,
        )
        #: µVMs baked here (served through the tree) and resumes from any bake.
        self.bakes = BakeManager(self.data_dir, self.vms, self.relays, self.link, agent=name,
                                 store_capacity=cache_capacity)
        # Registered last: the registry collects once now, to check the names are unique.
        self.metrics.collect_with(self._metric_families)

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
            await self.bakes.start()
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
        await self.bakes.stop()
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
        """Send a VM to another agent, named as Volt knows it: the address is Volt's
        record of that agent, never the caller's word. Over TLS the destination must
        be https:// and present that agent's certificate (``copy.send``).

        Raises ``NotFound`` (no such VM, or Volt knows no such agent), ``Conflict``
        (the destination is this agent) and ``Forbidden`` (Volt's address is plain
        http:// while this agent uses TLS)."""
        self.vms.get(name)  # an unknown VM is reported before the destination is looked up
        if destination == self.name:
            raise Conflict(f"VM {name!r} is already on agent {self.name!r}")
        url = (await self.link.agent_url(destination)).rstrip("/")
        tls = self.credentials.tls is not None
        if tls and not url.startswith("https://"):
            raise Forbidden(
                f"agent {destination!r} is registered at {url}, not https://: "
                f"a VM is sent only over verified TLS"
            )
        if url == self.url.rstrip("/"):
            raise Conflict(f"VM {name!r} is already on agent {self.name!r}")
        vm = self.vms.get(name)
        if vm.guest is not None and vm.guest.running:
            return await self.vms.migrate_live(
                name, url, destination, peer=destination if tls else None, keep=not move
            )
        return await self.vms.copy_out(
            name, url, move=move, peer=destination if tls else None
        )

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

    # --- metrics --------------------------------------------------------------------------

    def _metric_families(self) -> list[Metric]:
        """Read at every scrape of ``/metrics`` (in the event loop): the counters the
        relays, caches, NBD servers and the Volt link keep anyway."""
        relays = list(self.relays.relays.values())
        families = data_path_families(r.figures() for r in relays)
        families += nbd_families({
            "relay": [self.relays.server],
            "vm": [vm.server for vm in self.vms.list() if vm.server is not None],
        })
        group = self.relays.cache
        held = gauge("cache_bytes", "Bytes of image chunks this host's cache group holds.")
        held.add_metric([], group.bytes_held)
        capacity = gauge("cache_capacity_bytes", "The cache group's capacity.")
        capacity.add_metric([], group.capacity)
        evictions = counter(
            "cache_evictions", "Images evicted from the cache group (none of this host's "
            "VMs used them): over its capacity (reason=capacity), or to make room for a "
            "chunk of another image (reason=space).", ["reason"])
        evictions.add_metric(["capacity"], group.evicted_over_capacity)
        evictions.add_metric(["space"], group.evicted_for_space)
        level = gauge("tree_level", "This host's level in the image's relay tree "
                      "(1: below the origin).", ["image"])
        for r in relays:
            if r.paths is not None:
                level.add_metric([r.name], r.paths.level)
        vms = gauge("vms", "VMs on this host by state: detached (disk kept, no export), "
                    "no_guest (disk exported, no guest running), booting (guest started, "
                    "no console output yet), running, stopping.", ["state"])
        counts = dict.fromkeys(VmPhase, 0)
        for vm in self.vms.list():
            counts[VmPhase.of(vm)] += 1
        for phase, n in counts.items():
            vms.add_metric([phase.value], n)
        answered = counter("heartbeats_answered", "Heartbeats Volt answered.")
        answered.add_metric([], self.link.heartbeats_answered)
        missed = counter("heartbeats_missed", "Heartbeats that got no usable answer "
                         "(Volt unreachable, an error, a malformed answer).")
        missed.add_metric([], self.link.heartbeats_missed)
        reachable = gauge("volt_reachable", "1 while the last heartbeat reached Volt.")
        reachable.add_metric([], 1 if self.link.reachable else 0)
        return [*families, held, capacity, evictions, level, vms, answered, missed,
                reachable]


class VmPhase(enum.Enum):
    """Where a VM is, as ``virtman_vms`` counts it (the value is its ``state`` label)."""

    DETACHED = "detached"  # disk kept, no export
    NO_GUEST = "no_guest"  # disk exported, no guest running
    BOOTING = "booting"  # QEMU started, no console output yet
    RUNNING = "running"  # the console has printed
    STOPPING = "stopping"  # QEMU asked to stop

    @classmethod
    def of(cls, vm: Vm) -> VmPhase:
        if vm.record.state is VmState.DETACHED:
            return cls.DETACHED
        guest = vm.guest
        if guest is None or not guest.running:
            return cls.NO_GUEST
        if guest.state is GuestState.STARTING:
            return cls.BOOTING
        if guest.state is GuestState.STOPPING:
            return cls.STOPPING
        return cls.RUNNING
