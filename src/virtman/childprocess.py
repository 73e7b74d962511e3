"""Child processes that virtman's tools start and must not leave behind.

The local cluster (``virtman up``, the scale benchmark), the NBD benchmark's servers and
the tests' ``virtman serve`` processes are all handled the same way:

- a child runs in its own session, so a signal sent to its process group reaches what it
  forked too, and a Ctrl-C in the terminal reaches only the parent, which then stops it;
- its standard output and error go to one log file, and this run's lines (a restart may
  append to the same file) are what readiness checks and error messages read;
- it is ready when a predicate says so (a log line, a socket, an answer), checked until a
  deadline; if it exits first, or the deadline passes, it is stopped and the error
  carries its exit status and the tail of its log;
- it is stopped with SIGTERM to its process group, then SIGKILL after a grace period,
  and reaped; stopping twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from virtman.errors import ProcessFailed
from virtman.limits import (
    CHILD_LOG_TAIL_CHARS,
    CHILD_LOG_TAIL_LINES,
    CHILD_READY_POLL_SECONDS,
    CHILD_STOP_GRACE_SECONDS,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


class ChildProcess:
    """One started child: its argv, its log file, and the ``subprocess.Popen`` running it."""

    def __init__(self, name: str, argv: Sequence[str], log_path: str,
                 proc: subprocess.Popen[bytes], log_offset: int) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.proc = proc
        #: Size of the log file before this run: its own lines start here.
        self.log_offset = log_offset

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        append: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
    ) -> ChildProcess:
        """Start ``argv`` in its own session with its output in ``log_path``.

        ``append`` keeps what the log already holds (a restarted service); otherwise it
        is emptied. ``die_with_parent`` asks Linux to SIGTERM the child if this process
        dies without stopping it (a SIGKILLed benchmark harness).
        Raises ``ProcessFailed`` if the program cannot be started at all.
        """
        path = os.fspath(log_path)
        offset = os.path.getsize(path) if append and os.path.exists(path) else 0
        preexec = die_with_parent_hook() if die_with_parent else None
        with open(path, "ab" if append else "wb") as out:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,
                    env=env,
                    cwd=cwd,
                )
            except OSError as err:
                raise ProcessFailed(f"cannot start {' '.join(argv)}: {err}", name=name,
                                    returncode=None, log_tail="") from err
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return cls(name, argv, path, proc, offset)

    # --- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: the signal that ended it)."""
        return self.proc.poll()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> bytes:
        """Everything this run wrote to its log so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read()
        except OSError:
            return b""

    def search(self, pattern: bytes | re.Pattern[bytes]) -> re.Match[bytes] | None:
        """The first match of ``pattern`` in this run's log (a readiness predicate)."""
        return re.search(pattern, self.output())

    def tail(self, lines: int = CHILD_LOG_TAIL_LINES, chars: int = CHILD_LOG_TAIL_CHARS) -> str:
        """The last lines of this run's log, for error messages."""
        text = self.output().decode(errors="replace").strip()
        text = "\n".join(text.splitlines()[-lines:])
        return text if len(text) <= chars else "..." + text[-chars:]

    def check_running(self) -> None:
        """Raise ``ProcessFailed`` (with the log tail) if the child has exited."""
        rc = self.proc.poll()
        if rc is not None:
            raise ProcessFailed(f"exited with status {rc}", name=self.name, returncode=rc,
                                log_tail=self.tail())

    # --- readiness -------------------------------------------------------------------------

    def wait_ready(self, ready: Callable[[], T | None], timeout: float,
                   poll: float = CHILD_READY_POLL_SECONDS) -> T:
        """Call ``ready`` until it returns something true and return that.

        Raises ``ProcessFailed`` if the child exits first or ``timeout`` seconds pass;
        either way it is stopped first, so a child that never became ready never
        outlives the caller. An exception from ``ready`` stops it too and propagates.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.check_running()
                result = ready()
                if result:  # None and False: not yet
                    return result
                if time.monotonic() >= deadline:
                    raise self._not_ready(timeout)
                time.sleep(poll)
        except BaseException:
            self.stop()
            raise

    async def wait_ready_async(self, ready: Callable[[], T | None], timeout: float,
                               poll: float = CHILD_READY_POLL_SECONDS) -> T:
        """``wait_ready`` for an event loop: sleeps without blocking it."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.check_running()
                result = ready()
                if result:
                    return result
                if time.monotonic() >= deadline:
                    raise self._not_ready(timeout)
                await asyncio.sleep(poll)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise

    def _not_ready(self, timeout: float) -> ProcessFailed:
        return ProcessFailed(f"not ready within {timeout:g} s", name=self.name,
                             returncode=None, log_tail=self.tail())

    # --- stopping --------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, grace: float = CHILD_STOP_GRACE_SECONDS) -> int:
        """Send ``sig`` to the child's process group, SIGKILL it after ``grace`` seconds,
        reap it and return its exit status. Blocks; async callers run it in a thread."""
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %g s of %s: SIGKILL", self.name,
                            self.proc.pid, grace, signal.Signals(sig).name)
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        # Whatever the child forked into its group and left running.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL at once, like a host that dies; reap it."""
        return self.stop(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            # Not a group we may signal (a setuid wrapper): the child itself at least.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


_libc: Any = None


def die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook that sets PR_SET_PDEATHSIG, with prctl resolved here in the
    parent (looking it up in the forked child would not be safe); None off Linux.

    The signal comes when the *thread* that forked the child exits, so fork from the
    event loop's thread, not from a worker thread that may end first."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _ = _libc.prctl
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return None
    prctl = _libc.prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return hook
