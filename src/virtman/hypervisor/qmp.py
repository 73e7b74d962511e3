"""QEMU's monitor (QMP), spoken through ``qemu.qmp``, the QEMU project's own client.

Every guest starts with a QMP socket in its VM directory (``qemu_argv``), so an agent
can pause, save, resume, hot-plug and migrate it. This module holds the few QMP
conversations virtman needs, each a short sequence of documented commands; the wire
protocol (greeting, capabilities negotiation, ids, events) is the library's.

QEMU's QMP socket takes one client at a time. A ``Monitor`` keeps its connection for
the guest's life; commands from several tasks are serialised by the library.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from virtman.errors import GuestControlError
from virtman.limits import MEMORY_HOTPLUG_BLOCK_MIB, MIGRATION_POLL_SECONDS, QMP_CONNECT_SECONDS

log = logging.getLogger(__name__)

#: How often ``connect`` looks for the socket of a QEMU that is still starting.
_CONNECT_POLL_SECONDS = 0.02
#: Migration states (``query-migrate``'s ``status``) after which nothing more happens.
_MIGRATION_DONE = "completed"
_MIGRATION_FAILED = ("failed", "cancelled")


class Monitor:
    """One QMP connection to one QEMU. ``connect`` → commands → ``close``."""

    def __init__(self, guest: str, path: str) -> None:
        self.guest = guest
        self.path = path
        self._client: QMPClient | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self, limit: float = QMP_CONNECT_SECONDS) -> None:
        """Connect, waiting up to ``limit`` s for a starting QEMU to open its socket."""
        if self._client is not None:
            return
        deadline = time.monotonic() + limit
        while True:
            client = QMPClient(self.guest)
            try:
                await client.connect(self.path)
            except (ConnectError, OSError) as err:
                if time.monotonic() >= deadline:
                    raise GuestControlError(
                        self.guest, "connect", f"no monitor at {self.path} after {limit:g} s: {err}"
                    ) from err
                await asyncio.sleep(_CONNECT_POLL_SECONDS)
                continue
            self._client = client
            return

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            # QEMU may be gone already (the library then reports the EOF it read):
            # there is nothing to keep.
            except (QMPError, OSError, EOFError) as err:
                log.debug("guest %r: QMP disconnect: %s", self.guest, err)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; its ``return`` value. Errors name the command and QEMU's
        reason."""
        if self._client is None:
            await self.connect()
        assert self._client is not None
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise GuestControlError(self.guest, command, str(err)) from err
        except (QMPError, OSError) as err:
            # The connection broke (QEMU exited): the next command reconnects.
            await self.close()
            raise GuestControlError(self.guest, command, f"monitor connection lost: {err}") from err

    # --- run state ------------------------------------------------------------------------

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "inmigrate", "postmigrate", …"""
        doc = await self.execute("query-status")
        return str(doc["status"])

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    # --- migration ------------------------------------------------------------------------

    async def migrate(self, uri: str) -> dict[str, Any]:
        """Send the guest's state to ``uri`` (``exec:…``, ``tcp:…``, ``unix:…``) and wait
        until the migration completed; ``query-migrate``'s last answer (its ``ram``
        figures and ``downtime``). Raises ``GuestControlError`` if it failed."""
        await self.execute("migrate", {"uri": uri})
        return await self.wait_migration()

    async def wait_migration(self, poll: float = MIGRATION_POLL_SECONDS) -> dict[str, Any]:
        while True:
            doc: dict[str, Any] = await self.execute("query-migrate")
            status = doc.get("status", "none")
            if status == _MIGRATION_DONE:
                return doc
            if status in _MIGRATION_FAILED:
                raise GuestControlError(
                    self.guest, "migrate", f"migration {status}: {doc.get('error-desc', '?')}"
                )
            await asyncio.sleep(poll)

    async def incoming(self, uri: str) -> None:
        """Tell a QEMU started with ``-incoming defer`` where its state comes from."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def wait_incoming(self, poll: float = MIGRATION_POLL_SECONDS) -> None:
        """Until an incoming migration has been loaded (the run state left "inmigrate")."""
        while True:
            status = await self.status()
            if status != "inmigrate":
                if status not in ("paused", "running", "postmigrate", "prelaunch"):
                    raise GuestControlError(self.guest, "migrate-incoming",
                                            f"state not loaded: QEMU is {status!r}")
                return
            await asyncio.sleep(poll)

    async def set_capabilities(self, **capabilities: bool) -> None:
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name.replace("_", "-"), "state": on}
            for name, on in capabilities.items()
        ]})

    # --- sizing ---------------------------------------------------------------------------

    async def cpu_count(self) -> int:
        return len(await self.execute("query-cpus-fast"))

    async def hotplug_cpus(self, total: int) -> int:
        """Plug CPUs until the guest has ``total``; how many were added. The guest's
        ``-smp …,maxcpus=`` bounds it (``GuestControlError`` beyond)."""
        slots: list[dict[str, Any]] = await self.execute("query-hotpluggable-cpus")
        present = sum(1 for slot in slots if "qom-path" in slot)
        free = [slot for slot in slots if "qom-path" not in slot]
        wanted = total - present
        if wanted > len(free):
            raise GuestControlError(
                self.guest, "device_add",
                f"{total} CPUs asked for, the guest can have at most {present + len(free)}"
            )
        # Lowest ids first, so the guest numbers its CPUs in order.
        free.sort(key=lambda slot: tuple(sorted(slot["props"].items())))
        for slot in free[: max(wanted, 0)]:
            props = slot["props"]
            ident = "cpu-" + "-".join(str(props[k]) for k in sorted(props))
            await self.execute("device_add", {"driver": slot["type"], "id": ident, **props})
        return max(wanted, 0)

    async def memory_mib(self) -> int:
        doc = await self.execute("query-memory-size-summary")
        base = int(doc.get("base-memory", 0))
        plugged = int(doc.get("plugged-memory", 0))
        return (base + plugged) // (1024 * 1024)

    async def hotplug_memory(self, total_mib: int,
                             block_mib: int = MEMORY_HOTPLUG_BLOCK_MIB) -> int:
        """Plug DIMMs of ``block_mib`` until the guest has at least ``total_mib``; MiB
        added. The guest's ``-m …,slots=,maxmem=`` bounds it."""
        have = await self.memory_mib()
        added = 0
        index = len(await self.execute("query-memory-devices"))
        while have + added < total_mib:
            ident = f"dimm{index}"
            await self.execute("object-add", {
                "qom-type": "memory-backend-ram", "id": f"mem-{ident}",
                "size": block_mib * 1024 * 1024,
            })
            try:
                await self.execute("device_add", {"driver": "pc-dimm", "id": ident,
                                                  "memdev": f"mem-{ident}"})
            except GuestControlError:
                await self.execute("object-del", {"id": f"mem-{ident}"})
                raise
            added += block_mib
            index += 1
        return added

    async def generation_id(self) -> str:
        """The guest's VM generation ID (the ``vmgenid`` device's GUID)."""
        doc = await self.execute("query-vm-generation-id")
        return str(doc["guid"])
