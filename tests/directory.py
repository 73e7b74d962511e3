"""Volt's part for relay tests that run RelayManagers without Volt: one image record,
each host's place in a chain, and a boot profile kept as Volt keeps it."""

from __future__ import annotations

from virtman.agent.images import ImageSpec
from virtman.coordinator.models import Paths
from virtman.planner.profile import BootProfile


class StaticDirectory:
    def __init__(
        self, spec: ImageSpec, parents: list[str], profile: BootProfile | None = None
    ) -> None:
        self.spec = spec
        self.parents = parents
        self.profile_doc = profile
        #: Boot runs the agents sent, in order.
        self.runs: list[BootProfile] = []

    async def image_spec(self, name: str) -> ImageSpec:
        return self.spec

    async def join(self, image: str, relay_uri: str) -> Paths:
        return Paths(image=image, position=len(self.parents), level=len(self.parents),
                     parents=self.parents, parent_names=[f"p{i}" for i in self.parents],
                     origins=self.spec.origins)

    async def leave(self, image: str) -> None:
        return None

    async def profile(self, image: str) -> BootProfile | None:
        return self.profile_doc

    async def send_profile_run(self, image: str, run: BootProfile) -> int:
        self.runs.append(run)
        self.profile_doc = run if self.profile_doc is None else self.profile_doc.merge(run)
        return self.profile_doc.runs
