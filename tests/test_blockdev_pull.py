"""PullDevice, the destination's view of a migrating VM's disk: what it reads from the
source, what it keeps, and when (virtman.blockdev.pull)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from virtman.blockdev.base import DeviceState
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.faults import FaultyDevice
from virtman.blockdev.memory import MemoryDevice
from virtman.blockdev.pull import PullDevice, PullState, ReadOnlyView
from virtman.errors import DeviceError, InvalidRequest, LocalProtocolError

BS = 4096
SIZE = 16 * BS


def fill(byte: int, n: int = BS) -> bytes:
    return bytes([byte]) * n


async def make(tmp_path: Path) -> tuple[PullDevice, MemoryDevice, CowDevice]:
    base = MemoryDevice(data=fill(0xBB, SIZE))  # the destination's image cache
    source = MemoryDevice(data=fill(0xBB, SIZE))  # the source VM's disk, still written
    store = CowDevice(base, tmp_path / "store.overlay", owns_base=False, block_size=BS)
    pull = PullDevice(store, ReadOnlyView(source))
    await pull.open()
    return pull, source, store


async def test_nothing_read_before_the_switchover_is_kept(tmp_path: Path) -> None:
    pull, source, store = await make(tmp_path)
    try:
        await source.write(BS, fill(1))
        assert await pull.read(BS, BS) == fill(1)
        await source.write(BS, fill(2))  # the source guest writes on
        assert await pull.read(BS, BS) == fill(2), "a stale block was kept before the switch"
        assert store.allocated_runs() == []
        assert pull.live_bytes == 2 * BS and pull.pulled_bytes == 0
    finally:
        await pull.close()


async def test_after_the_switch_written_blocks_are_pulled_once_and_the_rest_is_local(
        tmp_path: Path) -> None:
    pull, source, store = await make(tmp_path)
    try:
        await source.write(2 * BS, fill(3, 2 * BS))
        # A block the source did not write but that differs there: proof of where a
        # read goes (in a real migration the two are equal).
        await source.write(10 * BS, fill(9))
        assert pull.switch([(2 * BS, 2 * BS)]) == 2 * BS
        assert pull.pull_state is PullState.PULLING
        # One block of the run read across its edge: only that block is pulled.
        assert await pull.read(BS + 100, BS) == fill(0xBB, BS - 100) + fill(3, 100)
        assert store.allocated_runs() == [(2 * BS, BS)]
        assert await pull.read(10 * BS, BS) == fill(0xBB)  # not written there: local
        await source.write(2 * BS, fill(7, 2 * BS))  # cannot happen; shows it is kept
        assert await pull.read(2 * BS, BS) == fill(3)
        assert await pull.pull_all(piece_bytes=BS) == BS  # only the block still missing
        assert pull.pull_state is PullState.COMPLETE
        assert store.allocated_runs() == [(2 * BS, 2 * BS)]
        assert await pull.read(0, SIZE) == (fill(0xBB, 2 * BS) + fill(3, BS) + fill(7, BS)
                                            + fill(0xBB, 12 * BS))
    finally:
        await pull.close()


async def test_switch_refuses_ranges_outside_the_disk_and_a_second_switch(
        tmp_path: Path) -> None:
    pull, _, _ = await make(tmp_path)
    try:
        with pytest.raises(LocalProtocolError, match="outside"):
            pull.switch([(SIZE - BS, 2 * BS)])
        with pytest.raises(LocalProtocolError, match="pull before the switchover"):
            await pull.pull_all(BS)
        pull.switch([])
        with pytest.raises(LocalProtocolError, match="switched twice"):
            pull.switch([])
        with pytest.raises(InvalidRequest):
            await ReadOnlyView(pull).write(0, b"x")
    finally:
        await pull.close()


class SlowSource(FaultyDevice):
    """A source whose reads take a while and fail if it was closed meanwhile, as a
    remote's would."""

    async def read(self, offset: int, length: int) -> bytes:
        data = await super().read(offset, length)
        if self.state is DeviceState.CLOSED:
            raise DeviceError("source closed under a read")
        return data


async def test_the_source_is_let_go_once_complete_but_not_under_a_read(tmp_path: Path) -> None:
    base = MemoryDevice(data=fill(0xBB, SIZE))
    source = SlowSource(MemoryDevice(data=fill(0xBB, 4 * BS) + fill(5, 12 * BS)), delay=0.05)
    store = CowDevice(base, tmp_path / "store.overlay", owns_base=False, block_size=BS)
    pull = PullDevice(store, source)
    await pull.open()
    try:
        pull.switch([(4 * BS, 12 * BS)])
        # The guest reads the last block just after the background pull asked for all:
        # both pull it, the background one ends first, and the source may close only
        # once the guest's read is done.
        background = asyncio.create_task(pull.pull_all(piece_bytes=64 * BS))
        await asyncio.sleep(0.01)
        assert await pull.read(15 * BS, BS) == fill(5)
        await background
        assert pull.pulled_bytes == 13 * BS  # the last block twice
        assert source.state is DeviceState.CLOSED
        assert await pull.read(0, SIZE) == fill(0xBB, 4 * BS) + fill(5, 12 * BS)
    finally:
        await pull.close()
