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
import logging
import time
from collections.abc import Callable

from virtman.blockdev.manifest import ManifestProgress, compute_manifest
from virtman.blockdev.remote import RemoteDevice
from virtman.coordinator.models import (
    AgentInfo,
    Heartbeat,
    HeartbeatReply,
    Image,
    ImageCreate,
    Paths,
    TreeNode,
    TreeView,
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
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
)
from virtman.planner.tree import RelayTree, TreeSettings

log = logging.getLogger(__name__)


class Lifecycle(enum.Enum):
    """Volt's lifecycle, entered in this order (NEW may go straight to STOPPED)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= interval:
            raise ConfigError(
                f"heartbeat timeout {timeout} s must exceed the interval {interval} s"
            )
        self.state = state
        try:
            self.settings = TreeSettings(fanout, parents_per_node)
        except PlannerError as err:
            raise ConfigError(f"relay tree settings: {err}") from err
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.lifecycle = Lifecycle.NEW
        self._images: dict[str, ImageRecord] = {r.name: r for r in state.images()}
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
                request.origins, connect_timeout=CONNECT_TIMEOUT_SECONDS, max_rounds=1
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
        return self._image_doc(record)

    def remove_image(self, name: str) -> None:
        self._check_open("remove an image")
        self.image(name)
        self.state.remove_image(name)
        del self._images[name], self._trees[name], self._relays[name]
        log.info("image %r removed", name)

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
            return self.paths(image, agent)
        tree.join(agent)
        self._relays[image][agent] = relay_uri
        self._save(image)
        log.info(
            "agent %r joined the tree of %r at position %d (level %d, parents %s)",
            agent,
            image,
            tree.position(agent),
            tree.level(agent),
            tree.parents(agent) or ["origin"],
        )
        return self.paths(image, agent)

    def leave(self, image: str, agent: str, *, reason: str = "left") -> None:
        self._check_open("remove an agent")
        tree = self.tree(image)
        if agent not in tree:
            raise NotFound(f"agent {agent!r} is not in the tree of {image!r}")
        change = tree.leave(agent)
        del self._relays[image][agent]
        self._save(image)
        moved = ", ".join(f"{h} {a}->{b}" for h, a, b in change.moved) or "none"
        log.info(
            "agent %r %s the tree of %r: moved %s; %d hosts get new parents",
            agent,
            reason,
            image,
            moved,
            len(change.affected),
        )

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
        known = agent in self._last_seen
        self._touch(agent, beat.url)
        if not known:
            log.info("agent %r registered at %s", agent, beat.url)
        paths: dict[str, Paths] = {}
        for image, relay_uri in beat.relays.items():
            if image not in self._images:
                continue  # removed from the registry; the agent will drop it
            paths[image] = self.join(image, agent, relay_uri)
        for image, tree in self._trees.items():
            if agent in tree and image not in beat.relays:
                self.leave(image, agent, reason="stopped relaying")
        return HeartbeatReply(interval=self.interval, timeout=self.timeout, paths=paths)

    def agent_url(self, agent: str) -> str:
        try:
            return self._agent_urls[agent]
        except KeyError:
            raise NotFound(f"no agent named {agent!r}") from None

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
        from every tree; return their names."""
        self._check_open("expire agents")
        now = self.clock() if now is None else now
        dead = [a for a, seen in self._last_seen.items() if now - seen > self.timeout]
        for agent in dead:
            images = [i for i, t in self._trees.items() if agent in t]
            log.warning(
                "agent %r silent for %.1f s: removing it from the trees of %s",
                agent,
                now - self._last_seen[agent],
                images or "no image",
            )
            for image in images:
                self.leave(image, agent, reason="failed out of")
                self.repairs += 1
            del self._last_seen[agent]
        return dead

    async def _detect_failures(self) -> None:
        while True:
            await asyncio.sleep(self.interval / 2)
            try:
                self.expire()
            except DeviceError as err:  # the database failed: try again next round
                log.error("failure detector: %s", err)
