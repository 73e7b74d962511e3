"""The VMs of one agent: create, snapshot, destroy, guests, and both ends of a copy.

Theory of operation
-------------------
Every VM sits on its image's relay (``RelayManager.image``), which it keeps in use
(``relay.users``) so the cache group never evicts it. Anything that makes a VM is built
in ``<data>/imports/`` and renamed into ``<data>/vms/`` only when whole, so a crash or a
refusal at any point leaves nothing half made; ``start()`` removes unfinished imports
and reopens every VM. Creates, destroys and snapshots take one lock, so two of them
never interleave; a clone or migrate marks its VM busy (``Vm.operation``) instead of
holding that lock, because it may take minutes.

A snapshot switches the VM's export to the new layer with ``Vm.serve_device`` between
two requests. Guest watchers are kept as tasks of this manager; an error in one is
logged, never lost, and ``stop()`` ends them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from virtman.agent.copy import (
    CopyLimits,
    CopyProgress,
    WriteTracker,
    check_destination,
    copy_stream,
    receive,
    send,
)
from virtman.agent.livemig import (
    Incoming,
    MigrationReport,
    drop_tls,
    free_port,
    qemu_tls_dir,
    tcp_uri,
    use_tls,
)
from virtman.agent.relays import RelayManager
from virtman.agent.vms import (
    ConsoleFollower,
    Layer,
    SocketOwner,
    TraceRecorder,
    Vm,
    VmRecord,
    VmState,
    check_socket_path,
    copy_layers,
    layer_file,
    merge_runs,
    remove_tree,
)
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.prefetch import RecordingDevice
from virtman.blockdev.pull import PullDevice, ReadOnlyView
from virtman.blockdev.remote import RemoteDevice
from virtman.durable import fsync_dir
from virtman.errors import (
    ApiError,
    ConfigError,
    Conflict,
    GuestControlError,
    NotFound,
    VirtmanError,
)
from virtman.httpapi import ApiClient, Credentials
from virtman.hypervisor.qemu import (
    Accel,
    Guest,
    GuestConfig,
    Hypervisor,
    HypervisorSettings,
    domain_xml,
)
from virtman.limits import GUEST_CONSOLE_POLL_SECONDS, MIGRATION_POLL_SECONDS, PROFILE_ASK_SECONDS
from virtman.nbd.server import Export
from virtman.protocol.uri import NbdAddress, parse_nbd_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsoleWait:
    """How a wait on a guest's console ended."""

    #: The pattern is on the console.
    matched: bool
    #: The guest still runs (False: it exited, or was never started).
    running: bool
    seconds: float
    #: Bytes of console output so far.
    console_bytes: int


class VmManager:
    def __init__(
        self,
        agent: str,
        data_dir: str,
        socket_dir: str,
        relays: RelayManager,
        *,
        copy_limits: CopyLimits | None = None,
        hypervisor: HypervisorSettings | None = None,
        credentials: Credentials | None = None,
        socket_owner: SocketOwner | None = None,
        on_created: Callable[[float], None] | None = None,
        on_booted: Callable[[float], None] | None = None,
        console_poll_seconds: float = GUEST_CONSOLE_POLL_SECONDS,
    ) -> None:
        self.agent = agent
        #: Seconds between two looks at a console someone waits on (``wait_console``).
        self.console_poll_seconds = console_poll_seconds
        #: What this agent presents to the agents it sends VMs to.
        self.credentials = credentials or Credentials()
        #: Who may use the VMs' export sockets (0600, this user's).
        self.socket_owner = socket_owner or SocketOwner.me()
        #: Called with the seconds a create took (request to export serving) and a
        #: guest's boot took (QEMU start to first console output): the agent's histograms.
        self.on_created = on_created
        self.on_booted = on_booted
        #: Starts guests (QEMU) with an accelerator that runs them here.
        self.hypervisor = Hypervisor(hypervisor)
        self.vms_dir = os.path.join(data_dir, "vms")
        self.imports_dir = os.path.join(data_dir, "imports")
        self.socket_dir = socket_dir
        self.relays = relays
        self.copy_limits = copy_limits or CopyLimits()
        self.vms: dict[str, Vm] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: VMs arriving by live migration, until confirmed (``incoming_*``).
        self._incoming: dict[str, Incoming] = {}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for d in (self.vms_dir, self.imports_dir):
            os.makedirs(d, exist_ok=True)
        self.socket_owner.secure_dir(self.socket_dir)  # ConfigError: at start, not per VM
        for leftover in os.listdir(self.imports_dir):
            log.warning("removing unfinished import %s", leftover)
            remove_tree(os.path.join(self.imports_dir, leftover))
        for name in sorted(os.listdir(self.vms_dir)):
            path = os.path.join(self.vms_dir, name, "vm.json")
            if not os.path.exists(path):
                continue
            try:
                await self._open(VmRecord.load(path))
            except (VirtmanError, OSError) as err:  # one bad VM must not keep the others down
                log.error("VM %r could not be reopened: %s", name, err)

    async def stop(self) -> None:
        """Close every VM (guests stop, exports finish their requests, overlays flush).
        A VM still arriving by live migration stays among the imports: removed at start."""
        for inc in self._incoming.values():
            if inc.task is not None:
                inc.task.cancel()
        for vm in list(self.vms.values()):
            await vm.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    # --- lookups ------------------------------------------------------------------------

    def get(self, name: str) -> Vm:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM named {name!r} on agent {self.agent!r}") from None

    def list(self) -> list[Vm]:
        return list(self.vms.values())

    def _socket_path(self, name: str) -> str:
        path = os.path.join(self.socket_dir, f"{name}.sock")
        check_socket_path(path)
        return path

    def qmp_path(self, name: str) -> str:
        """Where the guest's QEMU listens for its monitor (QMP). Beside the export socket,
        not in the VM directory: the socket directory is the one closed to all but the
        hypervisor's user (see ``vms.py``), and it is short enough for a Unix socket
        path (107 bytes) where a VM directory may not be."""
        path = os.path.join(self.socket_dir, f"{name}.qmp")
        check_socket_path(path)
        return path

    async def _open(self, record: VmRecord, *, boots: bool = False) -> Vm:
        """Open a VM's layers and export it. ``boots``: a new VM that boots from the
        image's first block (not a restart, an import or a snapshot's copy): its first
        reads may be recorded for the image's boot profile."""
        directory = os.path.join(self.vms_dir, record.name)
        vm = Vm(record, directory, self._socket_path(record.name))
        relay = await self.relays.image(record.image)
        base = relay.base
        if boots:
            # A profile may have come since the image was attached here: prefetch it.
            await self.relays.refresh_profile(relay, min_age=PROFILE_ASK_SECONDS)
            recorder = self.relays.boot_recorder(relay)
            if recorder is not None:
                base = RecordingDevice(relay.base, recorder)
        try:
            await vm.open_layers(base)
            relay.users.add(vm.name)
            relay.touch()
            if record.state is VmState.RUNNING:
                await vm.export(self.socket_owner)
        except BaseException:
            await vm.close()  # closes the layers it opened, never the shared cache
            relay.users.discard(vm.name)
            raise
        self.vms[vm.name] = vm
        return vm

    # --- create, destroy, snapshot ------------------------------------------------------

    async def create(
        self, name: str, image: str | None = None, from_snapshot: str | None = None
    ) -> Vm:
        began = time.monotonic()
        vm = await self._create(name, image, from_snapshot)
        if self.on_created is not None:
            self.on_created(time.monotonic() - began)
        return vm

    async def _create(self, name: str, image: str | None, from_snapshot: str | None) -> Vm:
        async with self._lock:
            existing = self.vms.get(name)
            if existing is not None:
                if (
                    existing.record.state is VmState.DETACHED
                    and image in (None, existing.record.image)
                    and from_snapshot is None
                ):
                    existing.record.state = VmState.RUNNING
                    existing.save()
                    await existing.export(self.socket_owner)
                    log.info("VM %r attached again", name)
                    return existing
                raise Conflict(f"a VM named {name!r} already exists on agent {self.agent!r}")
            self._socket_path(name)  # fail early on a path too long
            directory = os.path.join(self.vms_dir, name)
            tmp = os.path.join(self.imports_dir, f"create-{name}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            try:
                if from_snapshot is not None:
                    src_name, _, snap = from_snapshot.partition("/")
                    src = self.get(src_name)
                    if image is not None and image != src.record.image:
                        raise Conflict(
                            f"snapshot {from_snapshot!r} is of image "
                            f"{src.record.image!r}, not {image!r}"
                        )
                    try:
                        layers = await asyncio.to_thread(copy_layers, src, snap, tmp)
                    except KeyError:
                        raise NotFound(f"VM {src_name!r} has no snapshot {snap!r}") from None
                    image = src.record.image
                elif image is None:
                    raise Conflict("create needs an image or a snapshot")
                else:
                    layers = []
                await self.relays.image(image)  # the image must exist before anything is kept
                layers.append(Layer(layer_file(len(layers) + 1)))
                record = VmRecord(name, image, layers)
                record.save(os.path.join(tmp, "vm.json"))
                os.rename(tmp, directory)
                fsync_dir(self.vms_dir)
            except BaseException:
                remove_tree(tmp)
                raise
            try:
                vm = await self._open(record, boots=from_snapshot is None)
            except BaseException:
                remove_tree(directory)  # nothing half made stays behind
                raise
            log.info(
                "VM %r created on image %r%s",
                name,
                image,
                f" from snapshot {from_snapshot}" if from_snapshot else "",
            )
            return vm

    async def destroy(self, name: str, *, instance_only: bool = False) -> None:
        async with self._lock:
            vm = self.get(name)
            vm.check_idle()
            if instance_only:
                await vm.unexport()
                await vm.top.flush()
                vm.record.state = VmState.DETACHED
                vm.save()
                log.info("VM %r detached (its disk is kept)", name)
                return
            await self._remove(vm)
            log.info("VM %r destroyed", name)
        await self.relays.evict()

    async def _remove(self, vm: Vm) -> None:
        await vm.close()
        del self.vms[vm.name]
        relay = self.relays.get(vm.record.image)
        if relay is not None:
            relay.users.discard(vm.name)
            relay.touch()
        remove_tree(vm.directory)

    async def snapshot(self, name: str, snapshot: str) -> Vm:
        async with self._lock:
            vm = self.get(name)
            vm.check_idle()
            await self._freeze(vm, snapshot)
            return vm

    async def _freeze(self, vm: Vm, snapshot: str) -> None:
        """Freeze the VM's top layer as ``snapshot`` under a new top (the lock held)."""
        name = vm.name
        if snapshot in vm.record.snapshots:
            raise Conflict(f"VM {name!r} already has a snapshot named {snapshot!r}")
        await vm.top.flush()
        new_file = layer_file(len(vm.record.layers) + 1)
        new = CowDevice(
            vm.top,
            os.path.join(vm.directory, new_file),
            owns_base=True,
            meta={"vm": name, "image": vm.record.image},
        )
        await new.open()
        vm.record.layers[-1].snapshot = snapshot
        vm.record.layers.append(Layer(new_file))
        vm.save()
        vm.devices.append(new)
        old = vm.devices[-2]
        vm.serve_device(new)  # the next request on every connection goes to the new layer
        # Writes that were in flight landed in the frozen layer: make them durable
        # too, then freeze it for good.
        await old.flush()
        old.read_only = True
        log.info("VM %r: snapshot %r taken; writes go to %s", name, snapshot, new_file)

    # --- guests -------------------------------------------------------------------------

    async def start_guest(
        self,
        name: str,
        guest: GuestConfig | None = None,
        record: bool = False,
        accel: Accel | None = None,
        *,
        incoming: bool = False,
    ) -> Vm:
        """Boot a QEMU guest on the VM's export (``accel`` None: the agent's setting);
        ``incoming``: it does not boot but waits for a saved state (``agent.bakes``).

        Raises ``Conflict`` while the VM is cloned or migrated: a migrate refuses the
        writes it holds at its end, which a guest would see as I/O errors."""
        vm = self.get(name)
        vm.check_idle()
        if vm.record.state is not VmState.RUNNING or vm.server is None:
            raise Conflict(f"VM {name!r} is detached: create it again first")
        if vm.guest is not None and vm.guest.running:
            raise Conflict(f"VM {name!r} already has a running guest")
        if guest is None:
            guest = GuestConfig.from_dict(vm.record.guest) if vm.record.guest else GuestConfig()
        vm.record.guest = guest.to_dict()
        vm.save()
        vm.recorder = TraceRecorder() if record else None
        vm.server.recorder = vm.recorder.record if vm.recorder else None
        vm.guest = self.hypervisor.guest(name, vm.uri, guest, vm.console_log, accel,
                                         qmp_socket=self.qmp_path(name), incoming=incoming)
        vm.guest.on_console = self.on_booted
        await vm.guest.start()
        self._spawn(self._watch_guest(vm, vm.guest), f"watcher of VM {name!r}'s guest")
        return vm

    async def _watch_guest(self, vm: Vm, guest: Guest) -> None:
        rc = await guest.wait()
        recorder = vm.recorder
        if recorder is not None and recorder.requests:
            header = (
                f"{vm.name} on image {vm.record.image}: every request its guest sent "
                f"to its disk, recorded by virtman agent {self.agent}\n"
                "columns: seconds since first request, op, offset bytes, length bytes"
            )
            try:
                recorder.save(vm.trace_path, header)
            except OSError as err:
                log.error("VM %r: boot trace not saved to %s: %s", vm.name, vm.trace_path, err)
            else:
                log.info(
                    "VM %r: boot trace of %d requests saved to %s",
                    vm.name,
                    len(recorder.requests),
                    vm.trace_path,
                )
        if vm.server is not None:
            vm.server.recorder = None
        vm.recorder = None
        if rc not in (0, -15):
            log.warning("guest of VM %r exited with status %d", vm.name, rc)

    async def stop_guest(self, name: str) -> Vm:
        vm = self.get(name)
        if vm.guest is None or not vm.guest.running:
            raise Conflict(f"VM {name!r} has no running guest")
        await vm.guest.stop()
        return vm

    def console(self, name: str) -> str:
        vm = self.get(name)
        try:
            with open(vm.console_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} has no console log (its guest never started)") from None

    async def wait_console(
        self, name: str, pattern: re.Pattern[str] | None, timeout: float
    ) -> ConsoleWait:
        """Until ``pattern`` is on the guest's console, the guest is not running, or
        ``timeout`` seconds passed, whichever comes first (``pattern`` None: until the
        guest exits or the timeout).

        One request that waits here replaces a client polling the whole console and the
        VM's state over HTTPS: with two TCG guests on two cores that polling cost the
        guests ~3 CPU seconds per boot (docs/guests.md)."""
        vm = self.get(name)
        follower = ConsoleFollower(vm.console_log)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while True:
                # The state first: a guest that printed and exited is then seen with all
                # it printed, never as "exited without it".
                running = vm.guest is not None and vm.guest.running
                follower.look()
                matched = pattern is not None and pattern.search(follower.text) is not None
                waited = loop.time() - started
                if matched or not running or waited >= timeout:
                    return ConsoleWait(matched, running, waited, follower.size)
                await asyncio.sleep(min(self.console_poll_seconds, timeout - waited))
        finally:
            follower.close()

    def domain_xml(self, name: str) -> str:
        vm = self.get(name)
        guest = GuestConfig.from_dict(vm.record.guest) if vm.record.guest else GuestConfig()
        accel = vm.guest.accel if vm.guest is not None else None
        return domain_xml(name, name, vm.socket_path, guest, vm.console_log, accel)

    def boot_trace(self, name: str) -> str:
        vm = self.get(name)
        try:
            with open(vm.trace_path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(
                f"VM {name!r} has no recorded boot trace (start it with record)"
            ) from None

    # --- clone and migrate: the source ----------------------------------------------------

    async def copy_out(
        self, name: str, url: str, *, move: bool, peer: str | None = None
    ) -> dict[str, Any]:
        """Send the VM to the agent at ``url``; with ``move``, then remove it here.
        ``peer``: the agent name its TLS certificate must carry (``copy.send``).

        The VM serves here until the destination has acknowledged the whole copy; on any
        failure it goes on serving here and the error is raised (``NetworkError`` for a
        silent or lost destination, ``Conflict`` for a name taken there, ``ApiError``
        for any other refusal)."""
        what = "migrate" if move else "clone"
        vm = self.get(name)
        vm.check_idle()
        if move and vm.guest is not None and vm.guest.running:
            raise Conflict(f"VM {name!r} has a running guest: stop it before migrating")
        vm.operation = f"{what} to {url}"
        tracker = WriteTracker(vm.top)
        vm.serve_device(tracker)
        progress = CopyProgress()
        started = time.monotonic()
        log.info("VM %r: %s to %s started", name, what, url)
        try:
            doc = await send(
                url,
                {"name": name, "image": vm.record.image},
                copy_stream(vm, tracker, self.copy_limits, progress),
                self.copy_limits,
                credentials=self.credentials,
                peer=peer,
            )
        except BaseException as err:
            vm.serve_device(tracker.inner)
            tracker.release()
            vm.operation = None
            log.error(
                "VM %r: %s to %s failed after %.1f s and %d bytes streamed: %s; "
                "it stays here, serving",
                name,
                what,
                url,
                time.monotonic() - started,
                progress.bytes,
                err if isinstance(err, VirtmanError) else repr(err),
            )
            if isinstance(err, ApiError) and err.status == 409:
                raise Conflict(f"destination {url}: {err.detail}") from err
            raise
        held = time.monotonic() - progress.held_at if progress.held_at is not None else 0.0
        if move:
            tracker.release(refusal=f"VM {name!r} migrated to {url}")
            async with self._lock:
                vm.operation = None
                await self._remove(vm)
            await self.relays.evict()
        else:
            vm.serve_device(tracker.inner)
            tracker.release()
            vm.operation = None
        log.info(
            "VM %r %s to %s: %d bytes in %d records, %d passes, %.1f s (writes held %.3f s)",
            name,
            "migrated" if move else "cloned",
            url,
            progress.bytes,
            progress.records,
            progress.passes,
            time.monotonic() - started,
            held,
        )
        return doc

    # --- clone and migrate: the destination -----------------------------------------------

    async def import_vm(self, name: str, image: str, chunks: AsyncIterator[bytes]) -> Vm:
        """Receive a VM's stream; the VM exists only once all of it is here and flushed.

        A stream that is refused, cut, or silent for the idle timeout leaves nothing."""
        if name in self.vms:
            raise Conflict(f"a VM named {name!r} already exists on agent {self.agent!r}")
        self._socket_path(name)
        relay = await self.relays.image(image)
        relay.users.add(name)  # not evicted while the data streams in
        tmp = os.path.join(self.imports_dir, f"import-{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        records = nbytes = 0
        try:
            overlay = CowDevice(relay.base, os.path.join(tmp, layer_file(1)), owns_base=False)
            await overlay.open()
            try:
                async for piece in receive(chunks, relay.spec.size, self.copy_limits):
                    await overlay.write(piece.offset, piece.data)
                    records += 1
                    nbytes += len(piece.data)
                await overlay.flush()
            finally:
                await overlay.close()
            async with self._lock:
                if name in self.vms:
                    raise Conflict(f"a VM named {name!r} already exists on agent {self.agent!r}")
                record = VmRecord(name, image, [Layer(layer_file(1))])
                record.save(os.path.join(tmp, "vm.json"))
                os.rename(tmp, os.path.join(self.vms_dir, name))
                fsync_dir(self.vms_dir)  # durable before the source is told it may delete
        except BaseException as err:
            remove_tree(tmp)
            relay.users.discard(name)
            log.warning(
                "import of VM %r failed after %d records (%d bytes), nothing kept: %s",
                name,
                records,
                nbytes,
                err if isinstance(err, VirtmanError) else repr(err),
            )
            raise
        try:
            vm = await self._open(record)
        except BaseException:
            remove_tree(os.path.join(self.vms_dir, name))
            relay.users.discard(name)
            raise
        log.info("VM %r imported: %d bytes in %d records", name, nbytes, records)
        return vm

    # --- live migration: the source --------------------------------------------------------

    async def migrate_live(self, name: str, url: str, destination: str,
                           peer: str | None = None, *, keep: bool = False) -> dict[str, Any]:
        """Move the VM with its running guest to agent ``destination`` at ``url``
        (``virtman.agent.livemig``). On any failure before the destination confirmed,
        the guest runs on here and the error is raised.

        ``keep``: a clone. The source's disk is frozen as a snapshot at the switchover
        (the destination pulls from that snapshot) and its guest resumes here at once."""
        vm = self.get(name)
        vm.check_idle()
        guest = vm.guest
        if guest is None or not guest.running or guest.monitor is None or guest.accel is None:
            raise Conflict(f"VM {name!r} has no running guest to migrate live")
        monitor = guest.monitor
        limits = self.copy_limits
        if peer is not None:  # nothing is shown to a destination that is not the agent
            await check_destination(url, self.credentials, limits, peer)
        vm.check_idle()  # again: the check above waited
        what = "live clone" if keep else "live migration"
        vm.operation = f"{what} to {destination}"
        export = f"migrate-{name}-{uuid.uuid4().hex}"  # only the destination learns it
        self.relays.server.add_export(
            Export(export, ReadOnlyView(vm.top), f"VM {name} migrating to {destination}",
                   listed=False)
        )
        source_uri = NbdAddress(export=export, host=self.relays.nbd_host,
                                port=self.relays.nbd_port, tls=self.relays.tls is not None).uri()
        report = MigrationReport(name, destination)
        started = time.monotonic()
        log.info("VM %r: %s to %s (%s) started", name, what, destination, url)
        api = self.credentials.api(url, timeout=limits.idle_timeout)
        incoming = f"/vms/incoming/{name}"
        tls_id: str | None = None
        switched = False
        try:
            doc = await api.post("/vms/incoming", json={
                "name": name, "image": vm.record.image, "source_uri": source_uri,
                "source_agent": self.agent, "guest": vm.record.guest or {},
                "accel": guest.accel.value,
            })
            uri = str(doc["uri"])
            if self.relays.tls is not None:
                host = uri.split(":", 1)[1].rsplit(":", 1)[0].strip("[]")
                tls_dir = qemu_tls_dir(self.relays.tls, os.path.join(vm.directory, "tls"))
                tls_id = await use_tls(monitor, tls_dir, server=False, hostname=host)
            await monitor.execute("migrate-set-parameters",
                                  {"downtime-limit": limits.downtime_limit_ms})
            last_running = time.monotonic()
            async with asyncio.timeout(limits.total_timeout):
                await monitor.execute("migrate", {"uri": uri})
                while True:
                    state = await monitor.execute("query-migrate")
                    status = state.get("status", "none")
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        raise GuestControlError(name, "migrate", f"migration {status}: "
                                                f"{state.get('error-desc', '?')}")
                    if await monitor.status() == "running":
                        last_running = time.monotonic()
                    await asyncio.sleep(MIGRATION_POLL_SECONDS)
            await vm.settle()  # QEMU flushed; let our side of its last requests land
            runs = vm.written_runs()
            if keep:
                # The exported layer (the top until now) becomes the clone's frozen
                # source; the guest here resumes on a new top.
                report.snapshot = f"clone-to-{destination}-{time.strftime('%Y%m%dT%H%M%S')}"
                async with self._lock:
                    await self._freeze(vm, report.snapshot)
                await monitor.resume()
                report.measured_pause_seconds = time.monotonic() - last_running
            switch = await api.post(f"{incoming}/switch", json={"runs": runs})
            switched = True
            if not keep:
                report.measured_pause_seconds = time.monotonic() - last_running
            confirm = await api.post(f"{incoming}/confirm", timeout=limits.total_timeout)
        except BaseException as err:
            if switched and not keep:
                # The guest runs at the destination now, pulling from this export: the
                # copy here must neither run again (two guests on two disks) nor stop
                # serving. It stays paused, exported, for an operator to settle.
                await api.close()
                vm.operation = None
                log.critical("VM %r: moved to %s, which runs it, but did not confirm (%s); "
                             "the paused copy here and its export %r are kept: destroy "
                             "this VM once %s holds all of it", name, destination,
                             err if isinstance(err, VirtmanError) else repr(err), export,
                             destination)
                raise Conflict(f"VM {name!r} runs at {destination} but its move was not "
                               f"confirmed ({err}); the paused copy here is kept") from err
            await self._migration_undo(vm, api, incoming, tls_id)
            await api.close()
            self.relays.server.remove_export(export)
            vm.operation = None
            log.error("VM %r: %s to %s failed after %.1f s: %s; its guest runs "
                      "on here", name, what, destination, time.monotonic() - started,
                      err if isinstance(err, VirtmanError) else repr(err))
            if isinstance(err, ApiError) and err.status == 409:
                raise Conflict(f"destination {destination}: {err.detail}") from err
            raise
        await api.close()
        self.relays.server.remove_export(export)
        report.downtime_ms = int(state.get("downtime", 0))
        report.ram_bytes = int(state.get("ram", {}).get("transferred", 0))
        report.disk_bytes = int(confirm.get("pulled_bytes", 0))
        report.live_read_bytes = int(confirm.get("live_read_bytes", 0))
        report.seconds = time.monotonic() - started
        report.tls = tls_id is not None
        if keep:
            if tls_id is not None:
                try:
                    await drop_tls(monitor, tls_id)
                except VirtmanError as err:  # harmless: the next migration sets its own
                    log.warning("VM %r: migration TLS settings kept: %s", name, err)
            vm.operation = None
        else:
            async with self._lock:
                vm.operation = None
                await self._remove(vm)  # its QEMU is paused for good; the VM lives there
            await self.relays.evict()
        log.info("VM %r %s live to %s: downtime %d ms (QEMU), pause %.3f s (measured), "
                 "%d bytes of memory (%s), %d of disk, %.1f s; destination guest %s",
                 name, "cloned" if keep else "migrated", destination, report.downtime_ms,
                 report.measured_pause_seconds,
                 report.ram_bytes, "TLS" if report.tls else "plain TCP", report.disk_bytes,
                 report.seconds, switch.get("status"))
        return report.to_doc()

    async def _migration_undo(self, vm: Vm, api: ApiClient, incoming: str,
                              tls_id: str | None) -> None:
        """After a failed live migration: the guest runs here again, nothing is left at
        the destination if it can still be reached. Never raises: each step is logged."""
        guest = vm.guest
        if guest is not None and guest.monitor is not None and guest.running:
            try:
                await guest.monitor.execute("migrate_cancel")
                # A failed or cancelled migration resumes the guest itself; one that
                # completed (the destination failed after) leaves it paused.
                if await guest.monitor.status() != "running":
                    await guest.monitor.resume()
                if tls_id is not None:
                    await drop_tls(guest.monitor, tls_id)
            except VirtmanError as err:
                log.error("VM %r: guest not resumed after a failed migration: %s", vm.name, err)
        try:
            await api.delete(incoming)
        except VirtmanError as err:
            log.warning("VM %r: the destination's half-made VM not removed there (%s); a "
                        "destination that restarts removes it itself", vm.name, err)

    # --- live migration: the destination ---------------------------------------------------

    async def incoming_open(self, name: str, image: str, source_uri: str, source_agent: str,
                            guest: GuestConfig, accel: Accel) -> dict[str, Any]:
        """Make VM ``name`` to receive a running guest: its disk pulls the source's
        blocks, its QEMU waits for its memory. The TCP URI QEMU waits on.

        ``source_uri`` must be a source agent's TCP export of a migrating disk: this
        agent opens it with its own credentials, so a caller must not make it read one
        of its own sockets or exports (``ConfigError`` otherwise)."""
        source = parse_nbd_uri(source_uri)
        if source.is_unix or not source.export.startswith("migrate-"):
            raise ConfigError(f"source_uri {source_uri!r} is not a migrating disk's export "
                              "on another agent (nbd[s]://HOST:PORT/migrate-…)")
        if source.tls != (self.relays.tls is not None):
            raise ConfigError(f"source_uri {source_uri!r}: this cluster "
                              f"{'uses' if self.relays.tls else 'does not use'} TLS")
        async with self._lock:
            if name in self.vms:
                raise Conflict(f"a VM named {name!r} already exists on agent {self.agent!r}")
            socket_path = self._socket_path(name)
            qmp = self.qmp_path(name)
            relay = await self.relays.image(image)
            relay.users.add(name)
            tmp = os.path.join(self.imports_dir, f"incoming-{name}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            # The first layer is the source's disk at the switchover, frozen under a
            # name that says so; the guest writes to the second.
            frozen = f"migrated-from-{source_agent}-{time.strftime('%Y%m%dT%H%M%S')}"
            record = VmRecord(name, image, [Layer(layer_file(1), frozen), Layer(layer_file(2))],
                              guest=guest.to_dict())
            vm = Vm(record, tmp, socket_path)
            vm.operation = f"live migration from {source_agent}"
            meta = {"vm": name, "image": image}
            store = CowDevice(relay.base, os.path.join(tmp, layer_file(1)), owns_base=False,
                              meta=meta)
            pull = PullDevice(store, RemoteDevice([source_uri], tls=self.relays.tls))
            top = CowDevice(pull, os.path.join(tmp, layer_file(2)), meta=meta)
            try:
                await top.open()
                vm.devices = [store, top]
                await vm.export(self.socket_owner)
                vm.guest = self.hypervisor.guest(name, vm.uri, guest, vm.console_log, accel,
                                                 qmp_socket=qmp, incoming=True)
                await vm.guest.start()
                assert vm.guest.monitor is not None
                if self.relays.tls is not None:
                    await use_tls(vm.guest.monitor, qemu_tls_dir(
                        self.relays.tls, os.path.join(tmp, "tls")), server=True)
                uri = tcp_uri(self.relays.nbd_host, free_port(self.relays.nbd_host))
                await vm.guest.monitor.incoming(uri)
            except BaseException:
                await vm.close()
                if not vm.devices:
                    await top.close()
                remove_tree(tmp)
                relay.users.discard(name)
                raise
            self.vms[name] = vm
            self._incoming[name] = Incoming(vm, pull, tmp, source_agent)
        self._spawn(self._watch_incoming(self._incoming[name]),
                    f"watcher of VM {name!r}'s arriving guest")
        log.info("VM %r: live migration from %s: waiting for its memory on %s",
                 name, source_agent, uri)
        return {"uri": uri}

    async def _watch_incoming(self, inc: Incoming) -> None:
        """An arriving guest whose QEMU exits before the VM is confirmed (its memory
        stream broke: the source gave up or died) is given up here."""
        assert inc.vm.guest is not None
        await self._watch_guest(inc.vm, inc.vm.guest)
        if self._incoming.get(inc.vm.name) is inc:
            log.warning("VM %r: its arriving guest exited before the migration ended",
                        inc.vm.name)
            await self.incoming_abort(inc.vm.name)

    def incoming_source(self, name: str) -> str | None:
        """The agent VM ``name`` arrives from; None when nothing arrives by that name."""
        inc = self._incoming.get(name)
        return inc.source_agent if inc is not None else None

    def _incoming_of(self, name: str) -> Incoming:
        try:
            return self._incoming[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} arriving on agent {self.agent!r}") from None

    async def incoming_switch(self, name: str, runs: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """The source's guest is paused for good and wrote ``runs``: once the guest runs
        here, keep what is read from the source and pull the rest in the background."""
        inc = self._incoming_of(name)
        guest = inc.vm.guest
        assert guest is not None and guest.monitor is not None
        async with asyncio.timeout(self.copy_limits.idle_timeout):
            await guest.monitor.wait_incoming()
        if self._incoming.get(name) is not inc:  # given up while the state loaded
            raise Conflict(f"VM {name!r}: its arrival was given up during the switchover")
        # The disk learns what the source wrote before the guest runs here (QEMU waits
        # paused, -S, until this cont): its first reads already know what to pull.
        to_pull = inc.pull.switch(merge_runs([(int(o), int(n)) for o, n in runs]))
        inc.switched = True
        if await guest.monitor.status() != "running":
            await guest.monitor.resume()
        status = await guest.monitor.status()
        inc.task = asyncio.get_running_loop().create_task(
            inc.pull.pull_all(self.copy_limits.record_bytes), name=f"pull of VM {name!r}")
        inc.task.add_done_callback(lambda task: _log_pull_end(name, task))
        log.info("VM %r: guest runs here (%s); pulling %d bytes its source wrote",
                 name, status, to_pull)
        return {"status": status, "to_pull_bytes": to_pull}

    async def incoming_confirm(self, name: str) -> dict[str, Any]:
        """Until every block the source wrote is here; then the VM is one of this agent's
        (durable before the answer tells the source it may delete its copy)."""
        inc = self._incoming_of(name)
        if inc.task is None:
            raise Conflict(f"VM {name!r}: confirm before the switchover")
        task = inc.task
        try:
            async with asyncio.timeout(self.copy_limits.total_timeout):
                pulled = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._incoming.get(name) is not inc:
                # Given up meanwhile (its guest exited): the source must not delete.
                raise Conflict(f"VM {name!r} was given up here during its pull") from None
            raise
        vm = inc.vm
        await vm.top.flush()
        async with self._lock:
            if self._incoming.get(name) is not inc:
                raise Conflict(f"VM {name!r} was given up here during its pull")
            directory = os.path.join(self.vms_dir, name)
            vm.record.save(os.path.join(inc.directory, "vm.json"))
            os.rename(inc.directory, directory)
            fsync_dir(self.vms_dir)
            vm.directory = directory
            vm.operation = None
            del self._incoming[name]
        log.info("VM %r arrived by live migration from %s: %d bytes pulled, %d read live",
                 name, inc.source_agent, pulled, inc.pull.live_bytes)
        return {"pulled_bytes": inc.pull.pulled_bytes, "live_read_bytes": inc.pull.live_bytes}

    async def incoming_abort(self, name: str) -> None:
        """Give up an arriving VM: its QEMU stops, nothing of it stays."""
        inc = self._incoming_of(name)
        del self._incoming[name]
        if inc.task is not None:
            inc.task.cancel()
            await asyncio.gather(inc.task, return_exceptions=True)
        async with self._lock:
            await inc.vm.close()
            self.vms.pop(name, None)
            relay = self.relays.get(inc.vm.record.image)
            if relay is not None:
                relay.users.discard(name)
            remove_tree(inc.directory)
        log.warning("VM %r: live migration from %s given up here, nothing kept",
                    name, inc.source_agent)


def _log_pull_end(name: str, task: asyncio.Task[int]) -> None:
    """A pull that failed is said once here, even if no confirm ever waits for it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("VM %r: pulling its source's blocks failed: %s", name, task.exception())
