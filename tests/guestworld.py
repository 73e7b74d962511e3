"""What the tests of real QEMU guests share: the test image, and a cluster on loopback
that serves it (origin, Volt, agents, the image registered as "guest")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import require

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.hypervisor.testimage import GuestImage, build_test_image

#: Seconds an origin, Volt and the agents get to start and the image to register.
SETUP_SECONDS = 60


def make_guest_image(factory: pytest.TempPathFactory) -> GuestImage:
    """The bootable test image (skips where QEMU or the tools the tests use are missing)."""
    require("qemu-system-x86_64", "mkfs.ext4", "debugfs", "nbdcopy")
    return build_test_image(str(factory.mktemp("guest-image")))


@contextlib.asynccontextmanager
async def guest_cluster(root: Path, image: GuestImage,
                        settings: ClusterSettings) -> AsyncIterator[LocalCluster]:
    """A cluster in ``root`` serving ``image`` as "guest", stopped on exit."""
    c = LocalCluster(str(root), settings)
    try:
        async with asyncio.timeout(SETUP_SECONDS):
            await c.start_origin(image.image)
            await c.start_volt()
            for host in c.host_names():
                await c.start_agent(host)
            await c.register_image("guest")
        yield c
    finally:
        await c.stop()
