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
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from virtman.agent.copy import CopyLimits, CopyProgress, WriteTracker, copy_stream, receive, send
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
    remove_tree,
)
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.prefetch import RecordingDevice
from virtman.durable import fsync_dir
from virtman.errors import ApiError, Conflict, NotFound, VirtmanError
from virtman.httpapi import Credentials
from virtman.hypervisor.qemu import (
    Accel,
    Guest,
    GuestConfig,
    Hypervisor,
    HypervisorSettings,
    domain_xml,
)
from virtman.limits import GUEST_CONSOLE_POLL_SECONDS, PROFILE_ASK_SECONDS

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
        """Close every VM (guests stop, exports finish their requests, overlays flush)."""
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
            return vm

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
