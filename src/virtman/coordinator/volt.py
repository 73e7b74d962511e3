"""Volt, the coordinator: image registry, one relay tree per image, heartbeats, repair.

Theory of operation
-------------------
Agents report to Volt by heartbeat (every ``interval`` seconds) the images they relay
and the NBD URI of each relay export. Volt keeps every image's tree in a pure
``RelayTree`` (``virtman.planner``), mirrored in SQLite, and answers each heartbeat
with, per image, the agent's parents (NBD URIs, best first) and the origin(s), which
are every node's last path. An agent joins an image's tree the moment its relay export
is up (``join``), before it holds any data, and gets its parents in the answer.

A failure detector runs every ``interval / 2``: an agent silent for more than
``timeout`` seconds is removed from every tree. The planner refills each hole with one
host, and the hosts whose parents changed learn them in their next heartbeat answer,
so the tree is whole again within ``timeout + interval`` of the failure. The origin
path means no agent ever waits on the repair to keep its VMs reading.

Watchers (``watch``; the live view, ``coordinator/ui.py``) are called synchronously
after each change of a tree, of the image registry or of an agent's heartbeat stats,
with a ``VoltChange`` saying what changed; they must not block or raise.

On restart, trees come back from SQLite and every known agent is given a fresh
``timeout`` to heartbeat, so a Volt restart does not look like a mass failure.

Time comes from one injected clock (``time.monotonic`` unless a test passes its own),
so expiry is decided on the values that clock returns and is tested without sleeping.

Lifecycle (``Lifecycle``): NEW (answers requests, no failure detector:
tests drive ``expire`` themselves) -> RUNNING (``start``: the detector runs) ->
STOPPING -> STOPPED (``stop``: the detector ended, the database closed). After
``stop`` every call raises ``LifecycleError``: the database it would need is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtman.blockdev.manifest import ManifestProgress, compute_manifest
from virtman.blockdev.remote import RemoteDevice
from virtman.coordinator.models import (
    AgentInfo,
    Bake,
    BakeCreate,
    Heartbeat,
    HeartbeatReply,
    Image,
    ImageCreate,
    Paths,
    TreeNode,
    TreeView,
    bake_images,
)
from virtman.coordinator.state import ImageRecord, VoltState
from virtman.errors import (
    ConfigError,
    Conflict,
    DeviceError,
    LifecycleError,
    NotFound,
    PlannerError,
    VirtmanError,
)
from virtman.limits import (
    CONNECT_TIMEOUT_SECONDS,
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    MASS_SILENCE_HOLD_SECONDS,
    MASS_SILENCE_MIN_AGENTS,
    MASS_SILENCE_SHARE,
    MAX_NAME_LENGTH,
    PROFILE_MAX_RUNS,
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
)
from virtman.metrics import Metric, Metrics, gauge
from virtman.planner.profile import BootProfile
from virtman.planner.tree import RelayTree, TreeSettings
from virtman.tlsconfig import TlsFiles

log = logging.getLogger(__name__)


class LeaveReason(enum.Enum):
    """Why a host left a tree; the value is the ``reason`` label of
    ``virtman_tree_leaves_total``."""

    LEFT = "left"  # it asked (DELETE /images/{name}/members/{agent})
    STOPPED = "stopped"  # its heartbeat no longer lists the image
    FAILED = "failed"  # silent past the heartbeat timeout

    @property
    def said(self) -> str:
        """How the log line and the live view say it: "a <said> img"."""
        return {"left": "left", "stopped": "stopped relaying", "failed": "failed out of"}[
            self.value]


class Lifecycle(enum.Enum):
    """Volt's lifecycle, entered in this order (NEW may go straight to STOPPED)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ChangeKind(enum.Enum):
    """What a ``VoltChange`` is about."""

    TREE = "tree"  # a host joined, left or failed out of a tree (repairs included)
    IMAGES = "images"  # an image was registered or removed
    STATS = "stats"  # an agent's heartbeat stats differ from its previous ones


@dataclass(frozen=True)
class VoltChange:
    kind: ChangeKind
    #: One line for an operator (empty for stats, which change with every heartbeat).
    text: str = ""


class Volt:
    """The coordinator. Raises only ``VirtmanError``s: ``NotFound``, ``Conflict``,
    ``ConfigError`` (bad settings, an origin that cannot be read), ``DeviceError`` (its
    database failed) and ``LifecycleError`` (used after ``stop``, started twice)."""

    def __init__(
        self,
        state: VoltState,
        *,
        fanout: int = TREE_FANOUT,
        parents_per_node: int = TREE_PARENTS_PER_NODE,
        interval: float = HEARTBEAT_INTERVAL_SECONDS,
        timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
        mass_silence_share: float = MASS_SILENCE_SHARE,
        mass_silence_min_agents: int = MASS_SILENCE_MIN_AGENTS,
        mass_silence_hold: float = MASS_SILENCE_HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsFiles | None = None,
        max_profile_runs: int = PROFILE_MAX_RUNS,
    ) -> None:
        #: Volt's certificate, presented when it reads an origin to digest an image
        #: (origins of a secure cluster require a client certificate of its CA).
        self.tls = tls
        #: Runs merged into one boot profile before it is considered settled.
        self.max_profile_runs = max_profile_runs
        if timeout <= interval:
            raise ConfigError(
                f"heartbeat timeout {timeout} s must exceed the interval {interval} s"
            )
        self.state = state
        try:
            self.settings = TreeSettings(fanout, parents_per_node)
        except PlannerError as err:
            raise ConfigError(f"relay tree settings: {err}") from err
        if not 0 < mass_silence_share <= 1:
            raise ConfigError(f"mass silence share {mass_silence_share} must be in (0, 1]")
        self.interval = interval
        self.timeout = timeout
        self.mass_silence_share = mass_silence_share
        self.mass_silence_min_agents = mass_silence_min_agents
        self.mass_silence_hold = mass_silence_hold
        #: Since when expiry is held because most agents are late at once (None: not held).
        self.mass_silence_since: float | None = None
        self.clock = clock
        self.lifecycle = Lifecycle.NEW
        self._images: dict[str, ImageRecord] = {r.name: r for r in state.images()}
        self._profiles: dict[str, BootProfile] = {}
        for name, doc in state.profiles().items():
            record = self._images.get(name)
            if record is None:
                continue
            try:
                self._profiles[name] = BootProfile.from_doc(
                    json.loads(doc), chunk_size=record.chunk_size, image_size=record.size
                )
            except (ConfigError, ValueError) as err:  # never written so: a damaged file
                log.error("image %r: stored boot profile dropped: %s", name, err)
        self._trees: dict[str, RelayTree] = {}
        self._relays: dict[str, dict[str, str]] = {}  # image -> agent -> relay URI
        for name in self._images:
            members = state.members(name)
            try:
                tree = RelayTree(self.settings, {m.agent: m.position for m in members})
            except PlannerError as err:
                raise ConfigError(f"{state.path}: the tree of image {name!r}: {err}") from err
            self._trees[name] = tree
            self._relays[name] = {m.agent: m.relay_uri for m in members}
        self._bakes: dict[str, Bake] = {}
        for name, doc in state.bakes().items():
            try:
                self._bakes[name] = Bake.model_validate_json(doc)
            except ValueError as err:  # never written so: a damaged file
                log.error("bake %r: stored record dropped: %s", name, err)
        #: Bakes whose images are being registered (their origins read once).
        self._baking: set[str] = set()
        self._agent_urls = state.agents()
        now = clock()
        # Known agents get a full timeout after a restart before they count as silent.
        self._last_seen: dict[str, float] = {a: now for a in self._agent_urls}
        self._detector: asyncio.Task[None] | None = None
        #: Why the failure detector ended, if it did (a bug): reported by ``/health``.
        self.detector_error: BaseException | None = None
        self.repairs = 0
        #: Registrations under way: image name -> how far its manifest is.
        self._registering: dict[str, ManifestProgress] = {}
        #: Volt's Prometheus metrics (``GET /metrics``), in a registry of its own. Tree
        #: changes are counted as Volt decides them: no object remembers them otherwise.
        self.metrics = Metrics()
        self._joins = self.metrics.counter(
            "tree_joins", "Hosts placed in an image's relay tree.", ["image"])
        self._leaves = self.metrics.counter(
            "tree_leaves", "Hosts removed from an image's relay tree: asked to leave "
            "(reason=left), no longer relaying it by their heartbeat (reason=stopped), or "
            "silent past the heartbeat timeout (reason=failed).", ["image", "reason"])
        self._repairs = self.metrics.counter(
            "tree_repairs", "Holes a failed host left in an image's tree, refilled by the "
            "planner (its children get new parents in their next heartbeat).", ["image"])
        self._failed = self.metrics.counter(
            "agents_failed", "Agents that missed heartbeats for longer than the timeout "
            "and were removed from every tree.")
        self._beats = self.metrics.counter("heartbeats_received", "Heartbeats received.")
        self.metrics.collect_with(self._metric_families)
        #: The stats of each agent's last heartbeat (as sent: readers check what they use).
        self._stats: dict[str, dict[str, object]] = {}
        self._watchers: list[Callable[[VoltChange], None]] = []

    # --- lifecycle ----------------------------------------------------------------------------

    def _check_open(self, action: str) -> None:
        if self.lifecycle not in (Lifecycle.NEW, Lifecycle.RUNNING):
            raise LifecycleError("volt", action, self.lifecycle.value)

    def start(self) -> None:
        """Start the failure detector (in the running loop). Only from NEW."""
        if self.lifecycle is not Lifecycle.NEW:
            raise LifecycleError("volt", "start", self.lifecycle.value)
        self._detector = asyncio.get_running_loop().create_task(
            self._detect_failures(), name="volt failure detector"
        )
        self._detector.add_done_callback(self._detector_done)
        self.lifecycle = Lifecycle.RUNNING
        log.info(
            "volt up: %d images, %d agents known, tree fan-out %d, %d parents per node",
            len(self._images),
            len(self._agent_urls),
            self.settings.fanout,
            self.settings.parents_per_node,
        )

    async def stop(self) -> None:
        """Stop the detector and close the database; a second call does nothing."""
        if self.lifecycle in (Lifecycle.STOPPING, Lifecycle.STOPPED):
            return
        self.lifecycle = Lifecycle.STOPPING
        # A detector that already ended was reported by _detector_done: not raised again.
        if self._detector is not None and not self._detector.done():
            self._detector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._detector
        self.state.close()
        self.lifecycle = Lifecycle.STOPPED

    @property
    def detecting(self) -> bool:
        """Whether the failure detector is running."""
        return self._detector is not None and not self._detector.done()

    def _detector_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self.detector_error = task.exception()
        if self.detector_error is not None:  # a bug: no agent will be failed out any more
            log.error(
                "failure detector stopped; dead agents are no longer removed: %r",
                self.detector_error,
                exc_info=self.detector_error,
            )

    # --- watchers ------------------------------------------------------------------------------

    def watch(self, watcher: Callable[[VoltChange], None]) -> Callable[[], None]:
        """Call ``watcher`` after every change; returns the function that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def _changed(self, kind: ChangeKind, text: str = "") -> None:
        change = VoltChange(kind, text)
        for watcher in list(self._watchers):
            watcher(change)

    # --- images -------------------------------------------------------------------------------

    def image(self, name: str) -> ImageRecord:
        try:
            return self._images[name]
        except KeyError:
            raise NotFound(f"no image named {name!r}") from None

    def images(self) -> list[Image]:
        return [self._image_doc(r) for r in self._images.values()]

    @staticmethod
    def _image_doc(r: ImageRecord) -> Image:
        return Image(
            name=r.name,
            origins=r.origins,
            size=r.size,
            chunk_size=r.chunk_size,
            fingerprint=r.fingerprint,
            created=r.created,
        )

    async def add_image(self, request: ImageCreate) -> Image:
        """Register an image: reach its origin, read it once, store its digest manifest."""
        self._check_open("add an image")
        if request.name in self._images:
            raise Conflict(f"an image named {request.name!r} already exists")
        if request.name in self._registering:  # the origin is read once, not once per request
            raise Conflict(f"an image named {request.name!r} is being registered")
        progress = self._registering[request.name] = ManifestProgress()
        try:
            return await self._register(request, progress)
        finally:
            del self._registering[request.name]

    def registration(self, name: str) -> ManifestProgress:
        """How far the registration of image ``name`` is; NotFound if none is under way."""
        try:
            return self._registering[name]
        except KeyError:
            raise NotFound(f"no registration of an image named {name!r} is under way") from None

    async def _register(self, request: ImageCreate, progress: ManifestProgress) -> Image:
        try:
            origin = RemoteDevice(
                request.origins, connect_timeout=CONNECT_TIMEOUT_SECONDS, max_rounds=1,
                tls=self.tls,
            )
            await origin.open()
        except VirtmanError as err:  # messages quote the URIs as bounded prefixes
            raise ConfigError(f"origin of image {request.name!r} cannot be reached: {err}") from err
        try:
            started = self.clock()
            manifest = await compute_manifest(origin, request.chunk_size, progress=progress)
        except VirtmanError as err:
            raise ConfigError(f"origin of image {request.name!r} failed while read: {err}") from err
        finally:
            await origin.close()
        self._check_open("add an image")  # stopped while the origin was read
        if request.name in self._images:  # registered meanwhile by a concurrent request
            raise Conflict(f"an image named {request.name!r} already exists")
        record = ImageRecord(
            request.name,
            list(request.origins),
            manifest.size,
            request.chunk_size,
            manifest.to_json(),
            manifest.fingerprint(),
            time.time(),
        )
        self.state.add_image(record)
        self._images[record.name] = record
        self._trees[record.name] = RelayTree(self.settings)
        self._relays[record.name] = {}
        log.info(
            "image %r registered: %d bytes, %d chunks of %d (%d hold data), digests in %.1f s",
            record.name,
            record.size,
            manifest.count,
            record.chunk_size,
            len(manifest.data_digests),
            self.clock() - started,
        )
        self._changed(ChangeKind.IMAGES, f"image {record.name} registered")
        return self._image_doc(record)

    # --- boot profiles ----------------------------------------------------------------------

    def profile(self, name: str) -> BootProfile:
        """``name``'s boot profile; ``NotFound`` if the image has none (yet)."""
        self.image(name)
        profile = self._profiles.get(name)
        if profile is None:
            raise NotFound(f"image {name!r} has no boot profile yet")
        return profile

    def add_profile_run(self, name: str, doc: object, agent: str) -> BootProfile:
        """Merge one recorded boot (a profile document of one or more runs) into the
        image's profile. Past ``max_profile_runs`` runs the profile is settled: the run
        is acknowledged and dropped. ``ConfigError`` for a document that does not fit
        the image."""
        self._check_open("record a boot profile")
        record = self.image(name)
        run = BootProfile.from_doc(doc, chunk_size=record.chunk_size, image_size=record.size)
        current = self._profiles.get(name)
        if current is not None and current.runs >= self.max_profile_runs:
            return current
        merged = run if current is None else current.merge(run)
        self._keep_profile(name, merged)
        log.info("image %r: boot run from %s merged: %d runs, %d chunks", name, agent,
                 merged.runs, len(merged.entries))
        return merged

    def set_profile(self, name: str, doc: object | None) -> BootProfile | None:
        """Replace the image's profile (an import, a trace) or, with None, clear it."""
        self._check_open("set a boot profile")
        record = self.image(name)
        if doc is None:
            self.state.set_profile(name, None)
            self._profiles.pop(name, None)
            log.info("image %r: boot profile cleared", name)
            return None
        profile = BootProfile.from_doc(doc, chunk_size=record.chunk_size, image_size=record.size)
        self._keep_profile(name, profile)
        log.info("image %r: boot profile set: %d runs, %d chunks", name, profile.runs,
                 len(profile.entries))
        return profile

    def _keep_profile(self, name: str, profile: BootProfile) -> None:
        self.state.set_profile(name, json.dumps(profile.to_doc()))
        self._profiles[name] = profile

    def remove_image(self, name: str) -> None:
        self._check_open("remove an image")
        self.image(name)
        for bake in self._bakes.values():
            if name in (bake.state_image, bake.disk_image):
                raise Conflict(f"image {name!r} belongs to bake {bake.name!r}: remove the bake")
        self.state.remove_image(name)
        del self._images[name], self._trees[name], self._relays[name]
        self._profiles.pop(name, None)
        for family in (self._joins, self._repairs):
            with contextlib.suppress(KeyError):
                family.remove(name)
        for reason in LeaveReason:
            with contextlib.suppress(KeyError):
                self._leaves.remove(name, reason.value)
        log.info("image %r removed", name)
        self._changed(ChangeKind.IMAGES, f"image {name} removed")

    # --- bakes (prebaked µVMs) ----------------------------------------------------------------

    def bake(self, name: str) -> Bake:
        try:
            return self._bakes[name]
        except KeyError:
            raise NotFound(f"no bake named {name!r}") from None

    def bakes(self) -> list[Bake]:
        return list(self._bakes.values())

    async def add_bake(self, request: BakeCreate) -> Bake:
        """Register a bake: its state and its disk become two images (``NAME.state``,
        ``NAME.disk``) read once from the baking agent's exports, so they travel through
        relay trees like any image; then its record is kept. Nothing is kept on error."""
        self._check_open("add a bake")
        name = request.name
        if name in self._bakes or name in self._baking:
            raise Conflict(f"a bake named {name!r} already exists")
        state_image, disk_image = bake_images(name)
        if len(disk_image) > MAX_NAME_LENGTH or len(state_image) > MAX_NAME_LENGTH:
            raise ConfigError(
                f"bake name {name!r} is too long: its images {state_image!r} and "
                f"{disk_image!r} must fit in {MAX_NAME_LENGTH} characters"
            )
        self._baking.add(name)
        try:
            state = await self.add_image(ImageCreate(
                name=state_image, origins=[request.state_origin],
                chunk_size=request.state_chunk_size or request.chunk_size))
            try:
                if state.size < request.state_bytes:
                    raise ConfigError(
                        f"bake {name!r}: its state export holds {state.size} bytes, "
                        f"less than the {request.state_bytes} of its state"
                    )
                disk = await self.add_image(ImageCreate(
                    name=disk_image, origins=[request.disk_origin],
                    chunk_size=request.chunk_size))
            except BaseException:
                self.remove_image(state_image)
                raise
            bake = Bake(
                name=name, agent=request.agent, image=request.image, state_image=state_image,
                disk_image=disk_image, state_bytes=request.state_bytes, disk_bytes=disk.size,
                guest=request.guest, accel=request.accel, ready=request.ready,
                bake_seconds=request.bake_seconds, created=time.time(),
            )
            try:
                self.state.add_bake(name, bake.model_dump_json())
            except BaseException:
                self.remove_image(disk_image)
                self.remove_image(state_image)
                raise
            self._bakes[name] = bake
        finally:
            self._baking.discard(name)
        log.info("bake %r of image %r registered from agent %r: state %d bytes, disk %d bytes",
                 name, request.image, request.agent, bake.state_bytes, bake.disk_bytes)
        self._changed(ChangeKind.IMAGES, f"bake {name} registered")
        return bake

    def remove_bake(self, name: str) -> Bake:
        """Forget a bake and its two images (agents evict their copies when unused)."""
        self._check_open("remove a bake")
        bake = self.bake(name)
        self.state.remove_bake(name)
        del self._bakes[name]
        for image in (bake.state_image, bake.disk_image):
            if image in self._images:
                self.remove_image(image)
        log.info("bake %r removed", name)
        self._changed(ChangeKind.IMAGES, f"bake {name} removed")
        return bake

    # --- trees ----------------------------------------------------------------------------------

    def tree(self, image: str) -> RelayTree:
        self.image(image)
        return self._trees[image]

    def join(self, image: str, agent: str, relay_uri: str, url: str | None = None) -> Paths:
        """Place an agent in an image's tree (at once: parents before any data)."""
        self._check_open("place an agent")
        tree = self.tree(image)
        if url is not None:
            self._touch(agent, url)
        if agent in tree:
            if self._relays[image][agent] != relay_uri:
                self._relays[image][agent] = relay_uri
                self._save(image)
                self._changed(ChangeKind.TREE, f"{agent} moved its relay of {image}")
            return self.paths(image, agent)
        tree.join(agent)
        self._relays[image][agent] = relay_uri
        self._save(image)
        self._joins.labels(image).inc()
        log.info(
            "agent %r joined the tree of %r at position %d (level %d, parents %s)",
            agent,
            image,
            tree.position(agent),
            tree.level(agent),
            tree.parents(agent) or ["origin"],
        )
        self._changed(
            ChangeKind.TREE, f"{agent} joined {image} at level {tree.level(agent)}"
        )
        return self.paths(image, agent)

    def leave(self, image: str, agent: str, *, reason: LeaveReason = LeaveReason.LEFT) -> None:
        self._check_open("remove an agent")
        tree = self.tree(image)
        if agent not in tree:
            raise NotFound(f"agent {agent!r} is not in the tree of {image!r}")
        change = tree.leave(agent)
        del self._relays[image][agent]
        self._save(image)
        self._leaves.labels(image, reason.value).inc()
        moved = ", ".join(f"{h} {a}->{b}" for h, a, b in change.moved) or "none"
        log.info(
            "agent %r %s the tree of %r: moved %s; %d hosts get new parents",
            agent,
            reason.said,
            image,
            moved,
            len(change.affected),
        )
        moves = "".join(f"; {h} moved up" for h, _, _ in change.moved)
        self._changed(ChangeKind.TREE, f"{agent} {reason.said} {image}{moves}")

    def _save(self, image: str) -> None:
        self.state.save_tree(image, self._trees[image].positions(), self._relays[image])

    def paths(self, image: str, agent: str) -> Paths:
        tree = self.tree(image)
        names = tree.parents(agent)
        relays = self._relays[image]
        return Paths(
            image=image,
            position=tree.position(agent),
            level=tree.level(agent),
            parents=[relays[n] for n in names],
            parent_names=names,
            origins=self._images[image].origins,
        )

    def tree_view(self, image: str) -> TreeView:
        tree = self.tree(image)
        relays = self._relays[image]
        nodes = [
            TreeNode(
                agent=h,
                position=tree.position(h),
                level=tree.level(h),
                parents=tree.parents(h) or ["origin"],
                relay_uri=relays[h],
            )
            for h in tree.hosts
        ]
        return TreeView(
            image=image,
            fanout=self.settings.fanout,
            parents_per_node=self.settings.parents_per_node,
            depth=tree.depth,
            nodes=nodes,
        )

    # --- agents and heartbeats ------------------------------------------------------------------

    def _touch(self, agent: str, url: str) -> None:
        self._last_seen[agent] = self.clock()
        if self._agent_urls.get(agent) != url:
            self._agent_urls[agent] = url
            self.state.upsert_agent(agent, url)

    def heartbeat(self, agent: str, beat: Heartbeat) -> HeartbeatReply:
        """Record a heartbeat; reconcile the agent's memberships; answer its paths."""
        self._check_open("take a heartbeat")
        self._beats.inc()
        known = agent in self._last_seen
        self._touch(agent, beat.url)
        if not known:
            log.info("agent %r registered at %s", agent, beat.url)
        if self._stats.get(agent) != beat.stats:
            self._stats[agent] = beat.stats
            self._changed(ChangeKind.STATS)
        paths: dict[str, Paths] = {}
        for image, relay_uri in beat.relays.items():
            if image not in self._images:
                continue  # removed from the registry; the agent will drop it
            paths[image] = self.join(image, agent, relay_uri)
        for image, tree in self._trees.items():
            if agent in tree and image not in beat.relays:
                self.leave(image, agent, reason=LeaveReason.STOPPED)
        return HeartbeatReply(interval=self.interval, timeout=self.timeout, paths=paths)

    def agent_url(self, agent: str) -> str:
        try:
            return self._agent_urls[agent]
        except KeyError:
            raise NotFound(f"no agent named {agent!r}") from None

    def agent_stats(self, agent: str) -> dict[str, object]:
        """The stats of the agent's last heartbeat ({} before its first)."""
        return self._stats.get(agent, {})

    def agents(self) -> list[AgentInfo]:
        now = self.clock()
        return [
            AgentInfo(
                name=a,
                url=url,
                seconds_since_heartbeat=round(now - self._last_seen[a], 3),
                images=[i for i, t in self._trees.items() if a in t],
            )
            for a, url in sorted(self._agent_urls.items())
            if a in self._last_seen
        ]

    def expire(self, now: float | None = None) -> list[str]:
        """Remove agents silent for more than ``timeout`` (by ``clock``, or at ``now``)
        from every tree; return their names.

        None is removed while more than ``mass_silence_share`` of the agents (of at least
        ``mass_silence_min_agents``) are late, i.e. missed two heartbeats in a row, for
        at most ``mass_silence_hold`` s: that many hosts do not fail at once, but a boot
        storm saturating every link, or a stall of Volt's own, delays every heartbeat,
        and removing them would reshuffle the trees under booting VMs."""
        self._check_open("expire agents")
        now = self.clock() if now is None else now
        dead = [a for a, seen in self._last_seen.items() if now - seen > self.timeout]
        late_after = min(2 * self.interval, self.timeout)  # two heartbeats missed
        late = sum(1 for seen in self._last_seen.values() if now - seen > late_after)
        crowd = len(self._last_seen) >= self.mass_silence_min_agents
        if (
            dead
            and crowd
            and late > self.mass_silence_share * len(self._last_seen)
            and (
                self.mass_silence_since is None
                or now - self.mass_silence_since < self.mass_silence_hold
            )
        ):
            if self.mass_silence_since is None:
                self.mass_silence_since = now
                log.warning(
                    "%d of %d agents late at once (%d silent for over %.1f s): holding "
                    "every removal while most are late (a saturated network or a stall "
                    "of Volt's, not that many failures)",
                    late, len(self._last_seen), len(dead), self.timeout,
                )
            return []
        if self.mass_silence_since is not None:  # not holding any more
            log.warning(
                "mass silence over after %.1f s; %d agents still silent are removed",
                now - self.mass_silence_since, len(dead),
            )
            self.mass_silence_since = None
        for agent in dead:
            images = [i for i, t in self._trees.items() if agent in t]
            log.warning(
                "agent %r silent for %.1f s: removing it from the trees of %s",
                agent,
                now - self._last_seen[agent],
                images or "no image",
            )
            for image in images:
                self.leave(image, agent, reason=LeaveReason.FAILED)
                self.repairs += 1
                self._repairs.labels(image).inc()
            del self._last_seen[agent]
            self._failed.inc()
            self._stats.pop(agent, None)
        if dead:
            self._changed(ChangeKind.STATS)
        return dead

    # --- metrics --------------------------------------------------------------------------

    def _metric_families(self) -> list[Metric]:
        """Read at every scrape of ``/metrics``: the registry and the trees as they are."""
        images = gauge("images", "Images registered.")
        images.add_metric([], len(self._images))
        agents = gauge("agents", "Agents heard from within the heartbeat timeout (or "
                       "given a fresh timeout by a restart of Volt).")
        agents.add_metric([], len(self._last_seen))
        hosts = gauge("tree_hosts", "Hosts in an image's relay tree.", ["image"])
        depth = gauge("tree_depth", "Levels of an image's relay tree.", ["image"])
        for name, tree in sorted(self._trees.items()):
            hosts.add_metric([name], len(tree.hosts))
            depth.add_metric([name], tree.depth)
        return [images, agents, hosts, depth]

    async def _detect_failures(self) -> None:
        while True:
            await asyncio.sleep(self.interval / 2)
            try:
                self.expire()
            except DeviceError as err:  # the database failed: try again next round
                log.error("failure detector: %s", err)
