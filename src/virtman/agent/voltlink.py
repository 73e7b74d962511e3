"""The agent's link to Volt: heartbeats, image records, joining and leaving trees.

Theory of operation
-------------------
``VoltLink`` is everything the agent says to Volt and hears back. Its heartbeat task
reports what ``report()`` returns every ``interval`` seconds and hands each answer to
``on_reply``; Volt's answer may change the interval. While Volt is unreachable the
agent keeps serving with the paths it has: the link logs the outage once and Volt's
return once, and says which in ``reachable``.

A heartbeat that fails for an expected reason (Volt unreachable or answering with an
error, an answer that does not parse, paths a relay refuses) is logged once per
distinct reason and the next one is tried on time. Anything else is a bug: the task
ends, the error is logged with its traceback and kept in ``failure`` (shown in the
agent's status), rather than vanishing with an unreferenced task.

Lifecycle: ``CREATED → RUNNING → STOPPED``; ``stop()`` ends the task and the HTTP
client. ``image_spec``, ``join`` and ``leave`` work in any state but STOPPED.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from virtman.agent.images import ImageSpec
from virtman.coordinator.models import HeartbeatReply, Paths
from virtman.errors import (
    ApiError,
    ConfigError,
    LocalProtocolError,
    NetworkError,
    NotFound,
    PeerProtocolError,
    VirtmanError,
)
from virtman.httpapi import Credentials
from virtman.limits import HEARTBEAT_INTERVAL_SECONDS, HTTP_TIMEOUT_SECONDS
from virtman.planner.profile import BootProfile

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class VoltLink:
    def __init__(
        self,
        agent: str,
        volt_url: str,
        *,
        report: Callable[[], dict[str, Any]],
        on_reply: Callable[[HeartbeatReply], Awaitable[None]],
        interval: float = HEARTBEAT_INTERVAL_SECONDS,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        credentials: Credentials | None = None,
    ) -> None:
        self.agent = agent
        self.volt_url = volt_url
        #: This agent's HTTP URL, told to Volt with every heartbeat and join.
        self.url = ""
        self.interval = interval
        self.state = LinkState.CREATED
        #: The error that ended the heartbeat task, if one did (a bug, not an outage).
        self.failure: BaseException | None = None
        self._report = report
        self._on_reply = on_reply
        # Volt knows this agent by its certificate or its agent token.
        self._credentials = credentials or Credentials()
        self._api = self._credentials.api(volt_url, timeout=timeout)
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._last_error: str | None = None
        #: Heartbeats Volt answered, and those that got no usable answer (Volt
        #: unreachable, an error status, an answer that does not parse): for /metrics.
        self.heartbeats_answered = 0
        self.heartbeats_missed = 0

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self.state is not LinkState.CREATED:
            raise LocalProtocolError(f"volt link started while {self.state.value}")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="heartbeat")
        self._task.add_done_callback(self._task_ended)
        self.state = LinkState.RUNNING

    async def stop(self) -> None:
        if self.state is LinkState.STOPPED:
            return
        self.state = LinkState.STOPPED
        if self._task is not None:
            self._task.cancel()
            # Its end was already reported (``_task_ended``); waiting must not raise it again.
            await asyncio.wait([self._task])
        await self._api.close()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            self.failure = err
            log.error("heartbeats to volt stopped by an unexpected error", exc_info=err)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reachable": self.reachable,
            "interval": self.interval,
            "failure": repr(self.failure) if self.failure is not None else None,
        }

    # --- heartbeats ---------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except VirtmanError as err:
                # Expected trouble: say it once, keep beating on time.
                text = f"{type(err).__name__}: {err}"
                if text != self._last_error:
                    log.error("heartbeat failed: %s", text)
                    self._last_error = text
            else:
                self._last_error = None
            await asyncio.sleep(self.interval)

    async def heartbeat(self) -> None:
        """One heartbeat. Volt unreachable is not an error (logged once); an answer that
        does not parse raises ``PeerProtocolError``; ``on_reply`` raises what it raises."""
        try:
            doc = await self._api.post(f"/agents/{self.agent}/heartbeat", json=self._report())
        except (NetworkError, ApiError) as err:
            self.heartbeats_missed += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("volt unreachable (%s); serving with the paths we have", err)
            return
        if self._down_since is not None:
            log.info("volt reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
        try:
            reply = HeartbeatReply.model_validate(doc)
        except ValidationError as err:
            self.heartbeats_missed += 1
            raise PeerProtocolError(
                f"volt's heartbeat answer is malformed: {err.error_count()} errors, "
                f"first: {err.errors()[0]['msg']}"
            ) from err
        self.heartbeats_answered += 1
        self.interval = reply.interval
        await self._on_reply(reply)

    # --- images and trees ---------------------------------------------------------------

    async def image_spec(self, name: str) -> ImageSpec:
        """Volt's record of an image; ``NotFound`` when Volt has none by that name."""
        try:
            doc = await self._api.get(f"/images/{name}")
            manifest = await self._api.get(f"/images/{name}/manifest")
        except ApiError as err:
            if err.status == 404:
                raise NotFound(f"no image named {name!r} (volt: {err.detail})") from err
            raise
        try:
            return ImageSpec(
                name, list(doc["origins"]), int(doc["size"]), int(doc["chunk_size"]),
                json.dumps(manifest),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PeerProtocolError(f"volt's record of image {name!r} is malformed: {err}") from err

    async def join(self, image: str, relay_uri: str) -> Paths:
        """Join the image's tree with our relay export; our paths in it."""
        doc = await self._api.post(
            f"/images/{image}/members",
            json={"agent": self.agent, "relay_uri": relay_uri, "url": self.url},
        )
        try:
            return Paths.model_validate(doc)
        except ValidationError as err:
            raise PeerProtocolError(f"volt's answer to joining {image!r} is malformed") from err

    async def profile(self, image: str) -> BootProfile | None:
        """Volt's boot profile of ``image``; None when it has none yet."""
        try:
            doc = await self._api.get(f"/images/{image}/profile")
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        try:
            return BootProfile.from_doc(
                doc, chunk_size=int(doc["chunk_size"]), image_size=int(doc["image_bytes"])
            )
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise PeerProtocolError(
                f"volt's boot profile of image {image!r} is malformed: {err}"
            ) from err

    async def send_profile_run(self, image: str, run: BootProfile) -> int:
        """Send one recorded boot of ``image``; the runs Volt's profile now has."""
        doc = await self._api.post(
            f"/images/{image}/profile/runs", json={"agent": self.agent, "profile": run.to_doc()}
        )
        try:
            return int(doc["runs"])
        except (KeyError, TypeError, ValueError) as err:
            raise PeerProtocolError(f"volt's answer to a boot run of {image!r} is malformed") \
                from err

    async def leave(self, image: str) -> None:
        """Leave the image's tree (its relay export is gone)."""
        await self._api.delete(f"/images/{image}/members/{self.agent}")

    async def bake(self, name: str) -> dict[str, Any]:
        """Volt's record of a bake (``coordinator.models.Bake``); ``NotFound`` if none."""
        try:
            doc = await self._api.get(f"/bakes/{name}")
        except ApiError as err:
            if err.status == 404:
                raise NotFound(f"no bake named {name!r} (volt: {err.detail})") from err
            raise
        if not isinstance(doc, dict):
            raise PeerProtocolError(f"volt's record of bake {name!r} is malformed")
        return doc

    async def add_bake(self, doc: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Register a bake this agent serves; Volt reads its state and disk once to digest
        them, so this call may take ``timeout`` seconds, far beyond a heartbeat's."""
        async with self._credentials.api(self.volt_url, timeout=timeout) as api:
            answer = await api.post("/bakes", json=doc)
        if not isinstance(answer, dict):
            raise PeerProtocolError("volt's answer to a bake is malformed")
        return answer

    async def agent_url(self, name: str) -> str:
        """Another agent's HTTP URL; ``NotFound`` when Volt knows no such agent."""
        try:
            doc = await self._api.get(f"/agents/{name}")
        except ApiError as err:
            if err.status == 404:
                raise NotFound(f"no agent named {name!r}") from err
            raise
        return str(doc["url"])
