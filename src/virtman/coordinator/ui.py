"""Volt's live view: a web page of every image's relay tree, updated by server-sent events.

Routes (``ui_router``): ``GET /ui`` (the page), ``/ui/app.js`` and ``/ui/style.css`` (its
assets, package data: no CDN, no build step), ``GET /ui/snapshot`` (the document the
page draws, as JSON) and ``GET /ui/events`` (``text/event-stream``).

Theory of operation
-------------------
The page draws one document, the snapshot (``build_snapshot``): per image its hosts by
level with their parents, health, bytes from the origin and from parents, and VMs by
phase; Volt's repair count; the latest tree changes. Its numbers come from the agents'
heartbeat stats, which Volt keeps as sent: every field read here is checked and bounded
(only images Volt knows, only the VM phases in ``VM_PHASES``), so an agent cannot grow
the page or break it.

``UiHub`` watches Volt (``Volt.watch``). A change schedules one flush
``min_event_seconds`` later, so a burst of heartbeats becomes one event; the flush
builds the snapshot once and, when it differs from the last one sent, puts it in every
watcher's queue. A queue holds ``queue_events`` snapshots; as each is whole, a slow
watcher loses its oldest and still ends on the newest. Health depends on time as well as
on changes, so a stream with nothing to send asks for a flush every heartbeat interval
(sent only if something differs), and writes a keep-alive comment every
``keepalive_seconds``. At most ``max_clients`` streams run at once; one more is 503.

A stream ends when its client goes. uvicorn does not tell a stream that the server is
stopping: Volt's shutdown waits for open streams up to its graceful timeout (5 s).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse

from virtman.coordinator.volt import ChangeKind, Lifecycle, Volt, VoltChange
from virtman.limits import (
    UI_KEEPALIVE_SECONDS,
    UI_MAX_CLIENTS,
    UI_MIN_EVENT_SECONDS,
    UI_QUEUE_EVENTS,
    UI_RECENT_CHANGES,
)

log = logging.getLogger(__name__)

#: The VM phases an agent reports (``Vm.phase``), in the order the page shows them.
VM_PHASES = ("new", "booting", "booted", "detached")
#: A host whose last heartbeat is older than this many intervals is shown as late
#: (Volt removes it from its trees after its heartbeat timeout).
LATE_AFTER_INTERVALS = 2.0

#: The page's assets: file name -> media type.
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: Everything the page loads comes from Volt itself.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


def ui_url(volt_url: str, token: str | None = None) -> str:
    """The address of Volt's live view, as printed for an operator to open (with a
    viewer token, when the cluster has credentials)."""
    url = f"{volt_url.rstrip('/')}/ui"
    return f"{url}?token={token}" if token else url


@dataclass(frozen=True)
class UiLimits:
    max_clients: int = UI_MAX_CLIENTS
    queue_events: int = UI_QUEUE_EVENTS
    min_event_seconds: float = UI_MIN_EVENT_SECONDS
    keepalive_seconds: float = UI_KEEPALIVE_SECONDS
    recent_changes: int = UI_RECENT_CHANGES


def _count(value: object) -> int:
    """A counter from an agent's stats: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _section(stats: dict[str, object], key: str) -> dict[str, object]:
    value = stats.get(key)
    return value if isinstance(value, dict) else {}


def build_snapshot(volt: Volt, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """What the page draws, from Volt's trees and the agents' last heartbeat stats."""
    late_after = LATE_AFTER_INTERVALS * volt.interval
    agents: list[dict[str, Any]] = []
    hosts_by_name: dict[str, dict[str, Any]] = {}
    for info in volt.agents():
        stats = volt.agent_stats(info.name)
        phases = _section(stats, "vm_phases")
        agent: dict[str, Any] = {
            "name": info.name,
            "health": "ok" if info.seconds_since_heartbeat <= late_after else "late",
            "vms": {p: _count(phases.get(p)) for p in VM_PHASES},
            "images": info.images,
        }
        agents.append(agent)
        hosts_by_name[info.name] = agent
    images = []
    for image in volt.images():
        view = volt.tree_view(image.name)
        hosts: list[dict[str, Any]] = []
        for node in sorted(view.nodes, key=lambda n: n.position):
            known = hosts_by_name.get(node.agent)
            stats = volt.agent_stats(node.agent)
            received = _section(_section(stats, "images"), image.name)
            hosts.append(
                {
                    "name": node.agent,
                    "level": node.level,
                    "position": node.position,
                    "parents": node.parents,
                    "health": known["health"] if known else "late",
                    "from_origin": _count(received.get("from_origin")),
                    "from_parents": _count(received.get("from_parents")),
                    "vms": known["vms"] if known else dict.fromkeys(VM_PHASES, 0),
                }
            )
        images.append(
            {
                "name": image.name,
                "size": image.size,
                "fanout": view.fanout,
                "parents_per_node": view.parents_per_node,
                "depth": view.depth,
                "from_origin": sum(h["from_origin"] for h in hosts),
                "from_parents": sum(h["from_parents"] for h in hosts),
                "hosts": hosts,
            }
        )
    return {
        "interval": volt.interval,
        "timeout": volt.timeout,
        "repairs": volt.repairs,
        "images": images,
        "agents": agents,
        "changes": changes,
    }


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


class UiHub:
    """Turns Volt's changes into snapshots and hands them to every watcher's queue."""

    def __init__(self, volt: Volt, limits: UiLimits | None = None) -> None:
        self.volt = volt
        self.limits = limits or UiLimits()
        self._queues: set[asyncio.Queue[str]] = set()
        self._changes: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.limits.recent_changes
        )
        self._flush: asyncio.TimerHandle | None = None
        self._last = ""  # the last snapshot sent, without its version
        self.version = 0
        #: Snapshots dropped from full queues (slow watchers), for tests and /ui/snapshot.
        self.dropped = 0
        self._unwatch = volt.watch(self._on_change)

    @property
    def clients(self) -> int:
        return len(self._queues)

    def close(self) -> None:
        self._unwatch()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def snapshot(self) -> dict[str, Any]:
        doc = build_snapshot(self.volt, list(self._changes))
        doc["version"] = self.version
        return doc

    def _on_change(self, change: VoltChange) -> None:
        if change.kind is not ChangeKind.STATS and change.text:
            self._changes.appendleft({"time": round(time.time(), 3), "text": change.text})
        self.request_flush()

    def request_flush(self) -> None:
        """Send a snapshot soon (once for every change until then) if it differs."""
        if not self._queues or self._flush is not None:
            return  # nobody watches (Volt may even run outside a loop), or already due
        loop = asyncio.get_running_loop()
        self._flush = loop.call_later(self.limits.min_event_seconds, self._send)

    def _send(self) -> None:
        self._flush = None
        if self.volt.lifecycle not in (Lifecycle.NEW, Lifecycle.RUNNING):
            return  # stopping: the trees are no longer Volt's to show
        doc = build_snapshot(self.volt, list(self._changes))
        body = json.dumps(doc, sort_keys=True)
        if body == self._last:
            return
        self._last = body
        self.version += 1
        data = f'{body[:-1]}, "version": {self.version}}}'  # not encoded twice: 1000s of hosts
        for queue in self._queues:
            if queue.full():  # whole snapshots: the newest replaces the oldest
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(data)

    def subscribe(self) -> asyncio.Queue[str] | None:
        """A queue of snapshots (JSON), the first already in it; None when
        ``max_clients`` streams run."""
        if self.full:
            return None
        queue: asyncio.Queue[str] = asyncio.Queue(self.limits.queue_events)
        queue.put_nowait(json.dumps(self.snapshot(), sort_keys=True))
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._queues.discard(queue)

    @property
    def full(self) -> bool:
        return len(self._queues) >= self.limits.max_clients

    async def stream(self) -> AsyncIterator[bytes]:
        """The event stream of one watcher: ``snapshot`` first, then ``change`` events.
        It subscribes once it runs, so a response never sent holds no queue."""
        queue = self.subscribe()
        if queue is None:  # others took the last places since the route looked
            return
        try:
            yield b"retry: 1000\n\n"  # reconnect within a second after Volt comes back
            yield _event("snapshot", queue.get_nowait())
            idle = 0.0
            tick = min(self.volt.interval, self.limits.keepalive_seconds)
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), tick)
                except TimeoutError:
                    self.request_flush()  # health changes with time alone
                    idle += tick
                    if idle >= self.limits.keepalive_seconds:
                        idle = 0.0
                        yield b": keep-alive\n\n"
                    continue
                idle = 0.0
                yield _event("change", data)
        finally:
            self.unsubscribe(queue)


def _asset(name: str) -> bytes:
    return resources.files("virtman.coordinator").joinpath("ui", name).read_bytes()


def ui_router(hub: UiHub) -> APIRouter:
    """The live view's routes (Volt's app guards them for viewers and operators)."""
    router = APIRouter()
    assets = {name: _asset(name) for name in _ASSETS}
    headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}

    @router.get("/ui", include_in_schema=False)
    async def page() -> Response:
        return Response(assets["index.html"], media_type=_ASSETS["index.html"], headers=headers)

    @router.get("/ui/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(assets["app.js"], media_type=_ASSETS["app.js"], headers=headers)

    @router.get("/ui/style.css", include_in_schema=False)
    async def style() -> Response:
        return Response(assets["style.css"], media_type=_ASSETS["style.css"], headers=headers)

    @router.get("/ui/snapshot")
    async def snapshot() -> dict[str, Any]:
        return hub.snapshot()

    @router.get("/ui/events", include_in_schema=False)
    async def events() -> Response:
        if hub.full:
            return JSONResponse(
                {"detail": f"{hub.limits.max_clients} viewers already watch; try again later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return StreamingResponse(
            hub.stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
