"""Shared fixtures: image files made on the fly, and `virtman serve` subprocesses.

Every server a test starts is stopped by the fixture that started it (SIGTERM, then
SIGKILL), and every socket lives in the test's own temporary directory.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT = 20.0


def make_image(path: Path, size: int, *, seed: int = 1) -> bytes:
    """A file of `size` pseudo-random bytes (so a misplaced read shows), written to `path`."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


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
        self._log_file = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtman", *args], stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()}")
            if self.socket.exists() and b"serving" in self.log.read_bytes():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in {READY_TIMEOUT} s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


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
        served.stop(signal.SIGKILL if served.proc.poll() is None else signal.SIGTERM)
