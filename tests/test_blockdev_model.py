"""Every device against an in-memory model: random reads, writes, flushes, restarts,
and (for the devices with files) crashes. The bytes must always match the model.

A *crash* drops the device without closing it: nothing is synced, file descriptors are
closed as a killed process's would be (what reached the page cache stays). The model
of a crash follows the documented guarantees: an overlay keeps every block written up
to the last flush, and for blocks first written after it, either keeps or loses each
one whole; a cache serves the upstream's bytes whatever happened.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from devices import Rig, build, crash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.cow import CowDevice

SIZE = 96 * 1024
BLOCK = 4096


class DeviceModel(RuleBasedStateMachine):
    kind = "cow"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.rig: Rig = self.loop.run_until_complete(
            build(self.kind, Path(self.tmp.name), SIZE, chunk_size=16 * 1024, block_size=BLOCK))
        self.model = bytearray(self.rig.initial)
        # For overlays: blocks whose overlay content is durable (flushed), and the
        # content each block had at that flush.
        self.flushed = bytearray(self.rig.initial)

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(0, 20000))
    def read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        assert self.run(self.rig.device.read(offset, length)) == bytes(
            self.model[offset : offset + length])

    @precondition(lambda self: self.rig.writable)
    @rule(offset=st.integers(0, SIZE - 1), data=st.binary(min_size=1, max_size=9000))
    def write(self, offset: int, data: bytes) -> None:
        data = data[: SIZE - offset]
        self.run(self.rig.device.write(offset, data))
        self.model[offset : offset + len(data)] = data

    @precondition(lambda self: self.rig.writable)
    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 30000))
    def write_zeroes(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        self.run(self.rig.device.write_zeroes(offset, length))
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self.run(self.rig.device.flush())
        self.flushed = bytearray(self.model)

    @rule()
    def restart(self) -> None:
        self.run(self.rig.restart())
        self.flushed = bytearray(self.model)

    @precondition(lambda self: self.kind != "memory")
    @rule()
    def crash_and_reopen(self) -> None:
        crash(self.rig.device)
        self.rig.device = self.run(self.rig.reopen())  # type: ignore[assignment]
        device = self.rig.device
        if isinstance(device, CowDevice):
            # Each block is either as flushed, or as last written: never anything else.
            got = self.run(device.read(0, SIZE))
            assert isinstance(got, bytes)
            for b in range(0, SIZE, BLOCK):
                piece = got[b : b + BLOCK]
                assert piece in (bytes(self.flushed[b : b + BLOCK]),
                                 bytes(self.model[b : b + BLOCK])), f"block at {b} torn"
            self.model = bytearray(got)
        self.flushed = bytearray(self.model)

    @invariant()
    def cache_never_holds_wrong_chunks(self) -> None:
        device = self.rig.device
        while not isinstance(device, CachedDevice):
            device = getattr(device, "base", None)  # type: ignore[assignment]
            if device is None:
                return
        assert device.chunks_present <= device.chunks

    def teardown(self) -> None:
        try:
            self.run(self.rig.close())
        finally:
            self.loop.close()
            self.tmp.cleanup()


def _machine(kind: str) -> type[DeviceModel]:
    cls = type(f"Model_{kind}", (DeviceModel,), {"kind": kind})
    return cls


_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", ["memory", "file", "cached", "cow", "cow-over-cached-remote"])
def test_device_matches_model(kind: str) -> None:
    machine = _machine(kind)
    machine.TestCase.settings = _SETTINGS
    machine.TestCase().runTest()
