"""Shared fixtures: image files made on the fly, and `virtman serve` subprocesses.

Every server a test starts runs through ``virtman.childprocess`` and is stopped by the
fixture that started it (SIGKILL if the test left it running), and every socket lives in
the test's own temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agentworld import World

from virtman.childprocess import ChildProcess

READY_TIMEOUT = 20.0


def make_image(path: Path, size: int, *, seed: int = 1) -> bytes:
    """A file of `size` pseudo-random bytes (so a misplaced read shows), written to `path`."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``, e.g. "3m") mounted in ``tmp_path`` for
    one test: a small disk that fills up. Skips where it cannot be mounted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / f"tmpfs-{size}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """An origin, Volt and (on request) agents in the test's loop (``agentworld``);
    test files that need another shape of world define their own ``world``."""
    w = World(tmp_path)
    try:
        await w.start()
        yield w
    finally:
        await w.stop()


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: install qemu-utils, libnbd-bin, nbdkit")


class Served:
    """A running `virtman serve` process."""

    def __init__(self, args: list[str], socket: Path, export: str, log: Path) -> None:
        self.socket = socket
        self.export = export
        self.log = log
        self.child = ChildProcess.start(f"virtman serve ({log.stem})",
                                        [sys.executable, "-m", "virtman", *args], log)
        self.child.wait_ready(lambda: socket.exists() and b"serving" in self.child.output(),
                              READY_TIMEOUT)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.child.stop(sig)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Factory: serve("serve", ..., export=NAME) runs `virtman serve ... --socket S --export
    NAME` and returns it once it serves; every process it started is killed at teardown."""
    started: list[Served] = []
    counter = iter(range(1000))

    def start(*args: str, export: str, name: str | None = None) -> Served:
        label = name or f"s{next(counter)}"
        sock = tmp_path / f"{label}.sock"
        served = Served([*args, "--socket", str(sock), "--export", export], sock, export,
                        tmp_path / f"{label}.log")
        started.append(served)
        return served

    yield start
    for served in started:
        served.child.kill()


#: The start of a QEMU stand-in script: finds the file QEMU's ``-serial file:PATH`` names
#: and leaves it in ``$serial``, where the stand-in then plays a console.
QEMU_SERIAL_FROM_ARGV = """#!/bin/sh
serial=""
prev=""
for a in "$@"; do
  [ "$prev" = "-serial" ] && serial="${a#file:}"
  prev="$a"
done
"""
