"""The child-process helper, with real processes: ready, stopped, killed, failed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from virtman.childprocess import ChildProcess
from virtman.errors import ProcessFailed, VirtmanError

PRINTS_READY = "import time; print('ready on 42', flush=True); time.sleep(60)"
# Says so once its SIGTERM handler is in place, so the signal cannot come before it.
IGNORES_TERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ignoring', flush=True); time.sleep(60)")
EXITS_EARLY = "import sys; print('cannot open /nonexistent/disk.img', flush=True); sys.exit(3)"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ready_by_log_line_then_sigterm(tmp_path: Path) -> None:
    child = ChildProcess.start("echoer", _python(PRINTS_READY), tmp_path / "echoer.log")
    match = child.wait_ready(lambda: child.search(rb"ready on (\d+)"), timeout=20)
    assert match.group(1) == b"42"
    assert child.alive
    assert child.stop(grace=10) == -signal.SIGTERM
    assert not child.alive and _gone(child.pid)
    assert child.stop() == -signal.SIGTERM  # twice is harmless


def test_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    child = ChildProcess.start("stubborn", _python(IGNORES_TERM), tmp_path / "stubborn.log")
    child.wait_ready(lambda: b"ignoring" in child.output(), timeout=20)
    t0 = time.monotonic()
    assert child.stop(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 >= 0.5  # it got its grace first
    assert _gone(child.pid)


def test_child_exiting_early_gives_its_log_tail(tmp_path: Path) -> None:
    child = ChildProcess.start("server", _python(EXITS_EARLY), tmp_path / "server.log")
    with pytest.raises(ProcessFailed) as info:
        child.wait_ready(lambda: child.search(rb"ready"), timeout=20)
    err = info.value
    assert isinstance(err, VirtmanError)
    assert err.returncode == 3 and err.name == "server"
    assert "cannot open /nonexistent/disk.img" in err.log_tail
    assert "exited with status 3" in str(err) and "/nonexistent/disk.img" in str(err)


def test_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    child = ChildProcess.start("silent", _python("import time; time.sleep(60)"),
                               tmp_path / "silent.log")
    with pytest.raises(ProcessFailed, match=r"silent not ready within 0\.3 s") as info:
        child.wait_ready(lambda: child.search(rb"ready"), timeout=0.3)
    assert info.value.returncode is None
    assert not child.alive and _gone(child.pid)


def test_restart_appends_and_reads_only_its_own_lines(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    first = ChildProcess.start("svc", _python("print('serving on 1', flush=True)"), log)
    first.proc.wait(20)
    second = ChildProcess.start(
        "svc", _python("import time; print('serving on 2', flush=True); time.sleep(60)"),
        log, append=True)
    try:
        match = second.wait_ready(lambda: second.search(rb"serving on (\d)"), timeout=20)
        assert match.group(1) == b"2"  # not the first run's line
        assert b"serving on 1" in log.read_bytes()
    finally:
        second.stop()


def test_stop_reaches_what_the_child_forked(tmp_path: Path) -> None:
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', p.pid, flush=True); time.sleep(60)")
    child = ChildProcess.start("parent", _python(code), tmp_path / "parent.log")
    match = child.wait_ready(lambda: child.search(rb"grandchild (\d+)"), timeout=20)
    grandchild = int(match.group(1))
    child.stop()
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        # The grandchild is our child's child: init reaps it once it dies.
        time.sleep(0.05)
    assert _gone(grandchild)


def test_cannot_start_is_a_process_error(tmp_path: Path) -> None:
    with pytest.raises(ProcessFailed, match="cannot start"):
        ChildProcess.start("ghost", [str(tmp_path / "no-such-program")], tmp_path / "g.log")


async def test_wait_ready_async_does_not_block_the_loop(tmp_path: Path) -> None:
    child = ChildProcess.start("echoer", _python(PRINTS_READY), tmp_path / "echoer.log")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        await child.wait_ready_async(lambda: child.search(rb"ready"), timeout=20)
    finally:
        ticker.cancel()
        await asyncio.to_thread(child.stop)
    assert ticks >= 1
