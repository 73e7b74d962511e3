"""Every device against an in-memory model: random reads, writes, flushes, restarts,
and (for the devices with files) crashes. The bytes must always match the model.

A *crash* drops the device without closing it: nothing is synced, file descriptors are
closed as a killed process's would be (what reached the page cache stays). The model
of a crash follows the documented guarantees: an overlay keeps every block written up
to the last flush, and for blocks first written after it, either keeps or loses each
one whole; a cache serves the upstream's bytes whatever happened.

*Rot* changes bytes of held chunks in a stopped cache's file (after a clean stop or a
crash), as a disk could: the cache must still serve the upstream's bytes (each held
chunk is checked on its first read in a session), and every chunk it holds and calls
checked must be the upstream's.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from devices import Rig, build, cache_of, crash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtman.blockdev.cow import CowDevice
from virtman.blockdev.store import StoreFile

SIZE = 96 * 1024
BLOCK = 4096
#: Kinds with a chunk cache, whose file can rot.
CACHES = {"cached", "cached-manifest", "cow-over-cached-remote"}


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

    @precondition(lambda self: self.kind in CACHES)
    @rule(crashed=st.booleans(), picks=st.lists(st.integers(0, 1 << 30), min_size=1,
                                               max_size=4),
          position=st.integers(0, 16 * 1024 - 1))
    def rot_while_stopped(self, crashed: bool, picks: list[int], position: int) -> None:
        cache = cache_of(self.rig.device)
        assert cache is not None
        # An overlay on top is flushed first: what its crash may lose is crash_and_reopen's
        # to check; here only the cache below rots.
        self.run(self.rig.device.flush())
        if crashed:
            crash(self.rig.device)
        else:
            self.run(self.rig.device.close())
        store = StoreFile.open(cache.path)
        try:
            held = [i for i in range(store.header.units) if store.present[i]]
            for pick in picks if held else []:
                index = held[pick % len(held)]
                length = min(store.header.unit, store.header.size - index * store.header.unit)
                at = store.data_offset + index * store.header.unit + position % length
                os.pwrite(store.fd, bytes([os.pread(store.fd, 1, at)[0] ^ (1 + pick % 255)]), at)
        finally:
            os.close(store.fd)
        self.rig.device = self.run(self.rig.reopen())  # type: ignore[assignment]
        self.flushed = bytearray(self.model)

    @invariant()
    def cache_never_holds_wrong_chunks(self) -> None:
        cache = cache_of(self.rig.device)
        if cache is None or cache._store is None:
            return
        assert cache.chunks_present <= cache.chunks
        store, unit = cache._store, cache.chunk_size
        for index in range(cache.chunks):
            if cache._ready[index]:  # held and checked (or fetched) in this session
                assert store.present[index]
                start = index * unit
                assert store.pread(start, min(unit, SIZE - start)) == \
                    self.rig.initial[start : start + unit], f"chunk {index} wrong"

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


@pytest.mark.parametrize(
    "kind", ["memory", "file", "cached", "cached-manifest", "cow", "cow-over-cached-remote"])
def test_device_matches_model(kind: str) -> None:
    machine = _machine(kind)
    machine.TestCase.settings = _SETTINGS
    machine.TestCase().runTest()
