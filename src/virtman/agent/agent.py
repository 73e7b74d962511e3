"""The compute agent (VirtMan Compute): image relays, VMs, heartbeats to Volt.

Lifecycle: ``CREATED → STARTING → RUNNING → STOPPING → STOPPED``. ``start()`` removes
unfinished imports, reopens every image relay and VM found in the data directory
(VMs, snapshots and cache survive a restart), starts the relay NBD server and the
heartbeat loop. ``stop()`` stops heartbeats, VM exports (requests in flight finish,
overlays flush), relays, in that order.

While Volt is unreachable the agent keeps serving with the paths it has; it logs the
outage once and its return once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from virtman.agent.images import CacheGroup, DeliveryMode, ImageRelay, ImageSpec
from virtman.agent.vms import (
    Layer,
    RecordReader,
    TraceRecorder,
    Vm,
    VmRecord,
    VmState,
    check_socket_path,
    copy_layers,
    layer_file,
    remove_tree,
    written_data,
)
from virtman.coordinator.models import HeartbeatReply, Paths
from virtman.errors import ApiError, Conflict, NetworkError, NotFound, VirtmanError
from virtman.httpapi import ApiClient
from virtman.hypervisor.qemu import (
    Accel,
    Guest,
    GuestConfig,
    Hypervisor,
    HypervisorSettings,
    domain_xml,
)
from virtman.limits import DEFAULT_CACHE_CAPACITY, HEARTBEAT_INTERVAL_SECONDS
from virtman.nbd.server import NbdServer
from virtman.protocol.uri import NbdAddress

log = logging.getLogger(__name__)

#: Seconds a freshly joined image waits for its parents' connections before its VM
#: starts reading (reads meanwhile would go to the origin).
PARENT_CONNECT_WAIT_SECONDS = 1.0


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
        hypervisor: HypervisorSettings | None = None,
    ) -> None:
        self.name = name
        self.data_dir = os.path.abspath(data_dir)
        self.volt_url = volt_url
        self.url = ""  # set by the HTTP front once it listens
        self.nbd_host = nbd_host
        self.nbd_port = nbd_port
        self.socket_dir = os.path.abspath(socket_dir or os.path.join(self.data_dir, "sock"))
        self.heartbeat_interval = heartbeat_interval
        #: How images reach this host (benchmarks compare the alternatives).
        self.mode = mode
        #: PAPER mode: seconds one tree level takes to attach (the paper: 10 s of iSCSI).
        self.attach_delay = attach_delay
        #: Starts guests (QEMU) with an accelerator that runs them here.
        self.hypervisor = Hypervisor(hypervisor)
        self.state = AgentState.CREATED
        self.cache = CacheGroup(os.path.join(self.data_dir, "cache"), cache_capacity)
        self.relay_server = NbdServer([])
        self.vms: dict[str, Vm] = {}
        self.volt = ApiClient(volt_url)
        self._heartbeat: asyncio.Task[None] | None = None
        self._volt_down_since: float | None = None
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._vm_lock = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def vms_dir(self) -> str:
        return os.path.join(self.data_dir, "vms")

    @property
    def imports_dir(self) -> str:
        return os.path.join(self.data_dir, "imports")

    async def start(self) -> None:
        self.state = AgentState.STARTING
        for d in (self.vms_dir, self.imports_dir, self.socket_dir):
            os.makedirs(d, exist_ok=True)
        for leftover in os.listdir(self.imports_dir):
            log.warning("removing unfinished import %s", leftover)
            remove_tree(os.path.join(self.imports_dir, leftover))
        self.nbd_port = await self.relay_server.listen_tcp(self.nbd_host, self.nbd_port)
        for spec in self.cache.known_specs():
            try:
                await self._open_relay(spec)
            except Exception as err:  # one bad image must not keep the others down
                log.error("image %r could not be reopened: %s", spec.name, err)
        for name in sorted(os.listdir(self.vms_dir)):
            path = os.path.join(self.vms_dir, name, "vm.json")
            if not os.path.exists(path):
                continue
            try:
                await self._open_vm(VmRecord.load(path))
            except Exception as err:  # one bad VM must not keep the others down
                log.error("VM %r could not be reopened: %s", name, err)
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        self.state = AgentState.RUNNING
        log.info(
            "agent %r running: %d images, %d VMs, relays on %s:%d",
            self.name,
            len(self.cache.relays),
            len(self.vms),
            self.nbd_host,
            self.nbd_port,
        )

    async def stop(self) -> None:
        if self.state in (AgentState.STOPPING, AgentState.STOPPED):
            return
        self.state = AgentState.STOPPING
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for vm in list(self.vms.values()):
            await vm.close()
        await self.relay_server.stop()
        for relay in list(self.cache.relays.values()):
            await relay.close()
        await self.volt.close()
        self.state = AgentState.STOPPED
        log.info("agent %r stopped", self.name)

    # --- Volt -----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except Exception:  # a bad answer must not stop the heartbeats for good
                log.exception("heartbeat failed")
            await asyncio.sleep(self.heartbeat_interval)

    async def heartbeat(self) -> None:
        body = {
            "url": self.url,
            "relays": {n: r.relay_uri for n, r in self.cache.relays.items() if r.mode.in_tree},
            "stats": {"vms": len(self.vms)},
        }
        try:
            doc = await self.volt.post(f"/agents/{self.name}/heartbeat", json=body)
        except (NetworkError, ApiError) as err:
            if self._volt_down_since is None:
                self._volt_down_since = time.monotonic()
                log.warning("volt unreachable (%s); serving with the paths we have", err)
            return
        if self._volt_down_since is not None:
            log.info("volt reachable again after %.1f s", time.monotonic() - self._volt_down_since)
            self._volt_down_since = None
        reply = HeartbeatReply.model_validate(doc)
        self.heartbeat_interval = reply.interval
        for image, paths in reply.paths.items():
            relay = self.cache.relays.get(image)
            if relay is not None:
                try:
                    relay.apply(paths)
                except VirtmanError as err:
                    log.error("image %r: volt's paths %s refused: %s", image, paths.parents, err)
        await self.cache.evict()

    # --- images ---------------------------------------------------------------------------

    def relay_uri(self, image: str) -> str:
        return NbdAddress(export=image, host=self.nbd_host, port=self.nbd_port).uri()

    async def _open_relay(self, spec: ImageSpec) -> ImageRelay:
        relay = ImageRelay(
            spec,
            self.cache.image_dir(spec.name),
            self.relay_server,
            self.relay_uri(spec.name),
            self.mode,
        )
        await relay.open()
        self.cache.relays[spec.name] = relay
        return relay

    async def image(self, name: str) -> ImageRelay:
        """The relay of an image, set up (and joined to its tree) on first use."""
        relay = self.cache.relays.get(name)
        if relay is not None:
            return relay
        lock = self._image_locks.setdefault(name, asyncio.Lock())
        async with lock:
            relay = self.cache.relays.get(name)
            if relay is not None:
                return relay
            try:
                doc = await self.volt.get(f"/images/{name}")
                manifest = await self.volt.get(f"/images/{name}/manifest")
            except ApiError as err:
                if err.status == 404:
                    raise NotFound(f"no image named {name!r} (volt: {err.detail})") from err
                raise
            spec = ImageSpec(
                name, doc["origins"], doc["size"], doc["chunk_size"], json.dumps(manifest)
            )
            os.makedirs(self.cache.image_dir(name), exist_ok=True)
            spec.save(self.cache.spec_path(name))
            relay = await self._open_relay(spec)
            if not relay.mode.in_tree:
                return relay
            # The relay export is up: join now, so parents come before any data.
            try:
                doc = await self.volt.post(
                    f"/images/{name}/members",
                    json={"agent": self.name, "relay_uri": relay.relay_uri, "url": self.url},
                )
                paths = Paths.model_validate(doc)
                relay.apply(paths)
                if self.mode is DeliveryMode.PAPER and self.attach_delay:
                    # A host attaches only after its parent finished attaching.
                    await asyncio.sleep(paths.level * self.attach_delay)
                await self._wait_parents(relay)
            except (NetworkError, ApiError) as err:
                log.warning(
                    "image %r: could not join its tree yet (%s); reading from the "
                    "origin until the next heartbeat",
                    name,
                    err,
                )
            return relay

    @staticmethod
    async def _wait_parents(relay: ImageRelay) -> None:
        deadline = time.monotonic() + PARENT_CONNECT_WAIT_SECONDS
        while time.monotonic() < deadline:
            states = [p["state"] for p in relay.remote.path_status() if not p["fallback"]]
            if all(s in ("up", "retired") for s in states):
                return
            await asyncio.sleep(0.01)

    # --- VMs --------------------------------------------------------------------------------------

    def vm(self, name: str) -> Vm:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM named {name!r} on agent {self.name!r}") from None

    def _socket_path(self, name: str) -> str:
        path = os.path.join(self.socket_dir, f"{name}.sock")
        check_socket_path(path)
        return path

    async def _open_vm(self, record: VmRecord) -> Vm:
        directory = os.path.join(self.vms_dir, record.name)
        vm = Vm(record, directory, self._socket_path(record.name))
        relay = self.cache.relays.get(record.image)
        if relay is None:
            relay = await self.image(record.image)
        try:
            await vm.open_layers(relay.base)
            relay.users.add(vm.name)
            relay.touch()
            if record.state == VmState.RUNNING.value:
                await vm.export()
        except BaseException:
            await vm.close()  # closes the layers it opened, never the shared cache
            relay.users.discard(vm.name)
            raise
        self.vms[vm.name] = vm
        return vm

    async def create_vm(
        self, name: str, image: str | None = None, from_snapshot: str | None = None
    ) -> Vm:
        async with self._vm_lock:
            existing = self.vms.get(name)
            if existing is not None:
                if (
                    existing.record.state == VmState.DETACHED.value
                    and image in (None, existing.record.image)
                    and from_snapshot is None
                ):
                    existing.record.state = VmState.RUNNING.value
                    existing.save()
                    await existing.export()
                    log.info("VM %r attached again", name)
                    return existing
                raise Conflict(f"a VM named {name!r} already exists on agent {self.name!r}")
            self._socket_path(name)  # fail early on a path too long
            directory = os.path.join(self.vms_dir, name)
            tmp = os.path.join(self.imports_dir, f"create-{name}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            try:
                if from_snapshot is not None:
                    src_name, _, snap = from_snapshot.partition("/")
                    src = self.vm(src_name)
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
                await self.image(image)  # the image must exist before anything is kept
                layers.append(Layer(layer_file(len(layers) + 1)))
                record = VmRecord(name, image, layers)
                record.save(os.path.join(tmp, "vm.json"))
                os.rename(tmp, directory)
            except BaseException:
                remove_tree(tmp)
                raise
            try:
                vm = await self._open_vm(record)
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

    async def destroy_vm(self, name: str, *, instance_only: bool = False) -> None:
        async with self._vm_lock:
            vm = self.vm(name)
            if instance_only:
                await vm.unexport()
                await vm.top.flush()
                vm.record.state = VmState.DETACHED.value
                vm.save()
                log.info("VM %r detached (its disk is kept)", name)
                return
            await vm.close()
            del self.vms[name]
            relay = self.cache.relays.get(vm.record.image)
            if relay is not None:
                relay.users.discard(name)
                relay.touch()
            remove_tree(vm.directory)
            log.info("VM %r destroyed", name)
        await self.cache.evict()

    async def snapshot_vm(self, name: str, snapshot: str) -> Vm:
        from virtman.blockdev.cow import CowDevice

        async with self._vm_lock:
            vm = self.vm(name)
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
            if vm.server is not None:
                # The next request on every connection goes to the new layer.
                vm.server.exports[name].device = new
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
    ) -> Vm:
        """Boot a QEMU guest on the VM's export (``accel`` None: the agent's setting)."""
        vm = self.vm(name)
        if vm.record.state != VmState.RUNNING.value or vm.server is None:
            raise Conflict(f"VM {name!r} is detached: create it again first")
        if vm.guest is not None and vm.guest.running:
            raise Conflict(f"VM {name!r} already has a running guest")
        if guest is None:
            guest = GuestConfig.from_dict(vm.record.guest) if vm.record.guest else GuestConfig()
        vm.record.guest = guest.to_dict()
        vm.save()
        vm.recorder = TraceRecorder() if record else None
        vm.server.recorder = vm.recorder.record if vm.recorder else None
        vm.guest = self.hypervisor.guest(name, vm.uri, guest, vm.console_log, accel)
        await vm.guest.start()
        asyncio.get_running_loop().create_task(self._watch_guest(vm, vm.guest))
        return vm

    async def _watch_guest(self, vm: Vm, guest: Guest) -> None:
        rc = await guest.wait()
        recorder = vm.recorder
        if recorder is not None and recorder.requests:
            header = (
                f"{vm.name} on image {vm.record.image}: every request its guest sent "
                f"to its disk, recorded by virtman agent {self.name}\n"
                "columns: seconds since first request, op, offset bytes, length bytes"
            )
            recorder.save(vm.trace_path, header)
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
        vm = self.vm(name)
        if vm.guest is None or not vm.guest.running:
            raise Conflict(f"VM {name!r} has no running guest")
        await vm.guest.stop()
        return vm

    def console(self, name: str) -> str:
        vm = self.vm(name)
        try:
            with open(vm.console_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} has no console log (its guest never started)") from None

    def domain_xml(self, name: str) -> str:
        vm = self.vm(name)
        guest = GuestConfig.from_dict(vm.record.guest) if vm.record.guest else GuestConfig()
        accel = vm.guest.accel if vm.guest is not None else None
        return domain_xml(name, name, vm.socket_path, guest, vm.console_log, accel)

    def boot_trace(self, name: str) -> str:
        vm = self.vm(name)
        try:
            with open(vm.trace_path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(
                f"VM {name!r} has no recorded boot trace (start it with record)"
            ) from None

    # --- clone and migrate ----------------------------------------------------------------

    async def _agent_url(self, destination: str) -> str:
        if destination.startswith(("http://", "https://")):
            return destination
        try:
            doc = await self.volt.get(f"/agents/{destination}")
        except ApiError as err:
            if err.status == 404:
                raise NotFound(f"no agent named {destination!r}") from err
            raise
        return str(doc["url"])

    async def copy_vm(self, name: str, destination: str, *, move: bool) -> dict[str, Any]:
        """Send the VM's written data to another agent; with ``move``, then destroy it here."""
        vm = self.vm(name)
        url = await self._agent_url(destination)
        if url.rstrip("/") == self.url.rstrip("/"):
            raise Conflict(f"VM {name!r} is already on agent {self.name!r}")
        if move and vm.guest is not None and vm.guest.running:
            raise Conflict(f"VM {name!r} has a running guest: stop it before migrating")
        if move:
            await vm.unexport()  # the VM stops writing here before its data moves
        try:
            await vm.top.flush()
            async with ApiClient(url, timeout=3600) as dest:
                doc: dict[str, Any] = await dest.post(
                    "/vms/import",
                    params={"name": name, "image": vm.record.image},
                    content=written_data(vm),
                    headers={"content-type": "application/octet-stream"},
                )
        except BaseException as err:
            if move and vm.record.state == VmState.RUNNING.value and self.vms.get(name) is vm:
                await vm.export()  # untouched: serve it again here
            if isinstance(err, ApiError) and err.status == 409:
                raise Conflict(f"destination {destination!r}: {err.detail}") from err
            raise
        if move:
            await self.destroy_vm(name)
        log.info("VM %r %s to %s", name, "migrated" if move else "cloned", url)
        return doc

    async def import_vm(self, name: str, image: str, chunks: AsyncIterator[bytes]) -> Vm:
        """Receive a VM's written data; the VM exists only once all of it is here."""
        from virtman.blockdev.cow import CowDevice

        if name in self.vms:
            raise Conflict(f"a VM named {name!r} already exists on agent {self.name!r}")
        self._socket_path(name)
        relay = await self.image(image)
        relay.users.add(name)  # not evicted while the data streams in
        tmp = os.path.join(self.imports_dir, f"import-{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            overlay = CowDevice(relay.base, os.path.join(tmp, layer_file(1)), owns_base=False)
            await overlay.open()
            reader = RecordReader(relay.spec.size)
            try:
                async for chunk in chunks:
                    for offset, data in reader.feed(chunk):
                        await overlay.write(offset, data)
                reader.finish()
                await overlay.flush()
            finally:
                await overlay.close()
            async with self._vm_lock:
                if name in self.vms:
                    raise Conflict(f"a VM named {name!r} already exists on agent {self.name!r}")
                record = VmRecord(name, image, [Layer(layer_file(1))])
                record.save(os.path.join(tmp, "vm.json"))
                os.rename(tmp, os.path.join(self.vms_dir, name))
        except BaseException:
            remove_tree(tmp)
            relay.users.discard(name)
            raise
        try:
            vm = await self._open_vm(record)
        except BaseException:
            remove_tree(os.path.join(self.vms_dir, name))
            relay.users.discard(name)
            raise
        log.info("VM %r imported: %d bytes in %d records", name, reader.bytes, reader.records)
        return vm

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "volt_reachable": self._volt_down_since is None,
            "relay_nbd": f"{self.nbd_host}:{self.nbd_port}",
            "mode": self.mode.value,
            "relay_bytes_sent": self.relay_server.stats.bytes_read,
            # CPU this agent process has used (all threads): what serving costs a host.
            "cpu_seconds": round(time.process_time(), 3),
            "cache": self.cache.status(),
            "images": {n: r.status() for n, r in self.cache.relays.items()},
            "vms": [vm.info() for vm in self.vms.values()],
        }
