"""Rate-limited log lines: the first of a kind from a peer, then how many more came.

A service that logs one warning per bad request lets any client grow the log faster than
it sends bytes (10,000 refused 28-byte WRITEs wrote 1.25 MB of log, 4.5x the bytes
received). ``RateLimitedLog`` keeps one *window* per ``(peer, kind)``: the first event
opens it and is logged as usual; further events in the next ``interval`` seconds are only
counted. When the window has expired its count is logged as one summary line, "N more
like this (KIND from PEER) in the last T s", and the window is dropped. So one peer
repeating one mistake costs at most two lines per interval, whatever its rate.

Summaries are written when the next event of any key arrives after the interval, when
the owner calls ``sweep()`` (``schedule`` lets it arm a timer for that) and at
``flush()``, which the owner calls when it stops. At most ``max_keys`` peer windows are kept;
events of further peers share one window per kind under the peer ``OTHER_PEERS``, so a
flood from many addresses (a local user can bind any of 127.0.0.0/8) costs bounded
memory and bounded log.

The clock is injectable so tests drive windows with explicit times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtman.errors import ConfigError
from virtman.limits import LOG_REPEAT_INTERVAL_SECONDS, LOG_REPEAT_MAX_KEYS

#: Peer name under which events are counted once ``max_keys`` windows are open.
OTHER_PEERS = "other peers"

ExcInfo = BaseException | bool | None


@dataclass
class _Window:
    start: float
    level: int
    suppressed: int = 0


class RateLimitedLog:
    """Logs to ``logger`` at most one line per ``(peer, kind)`` per ``interval`` seconds,
    plus one summary of the lines it held back.

    ``schedule(delay, callback)``, when given, is called once per window that starts
    holding lines back, so the owner can run ``sweep()`` when it expires (an event loop's
    ``call_later``); without it, summaries wait for a later event or ``flush()``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = LOG_REPEAT_INTERVAL_SECONDS,
        max_keys: int = LOG_REPEAT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        if interval <= 0 or max_keys < 1:
            raise ConfigError(
                f"RateLimitedLog needs interval > 0 and max_keys >= 1, got {interval}, {max_keys}"
            )
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self.schedule = schedule
        #: Lines held back since this object was made (summaries report them).
        self.suppressed = 0
        self._windows: dict[tuple[str, str], _Window] = {}
        self._swept_at = clock()

    def log(
        self,
        level: int,
        peer: str,
        kind: str,
        msg: str,
        *args: object,
        exc_info: ExcInfo = None,
    ) -> bool:
        """Log ``msg % args`` unless ``(peer, kind)`` was logged less than ``interval``
        seconds ago, in which case count it. Return whether the line was written."""
        now = self.clock()
        if now - self._swept_at >= self.interval:
            self.sweep()
        key = (peer, kind)
        if key not in self._windows and len(self._windows) >= self.max_keys:
            key = (OTHER_PEERS, kind)
        window = self._windows.get(key)
        if window is not None:
            if now - window.start < self.interval:
                window.suppressed += 1
                self.suppressed += 1
                if window.suppressed == 1 and self.schedule is not None:
                    self.schedule(window.start + self.interval - now, self.sweep)
                return False
            self._close(key, window, now)
        self._windows[key] = _Window(now, level)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, peer: str, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, peer, kind, msg, *args)

    def error(
        self, peer: str, kind: str, msg: str, *args: object, exc_info: ExcInfo = None
    ) -> bool:
        return self.log(logging.ERROR, peer, kind, msg, *args, exc_info=exc_info)

    def sweep(self) -> None:
        """Summarise and drop every window whose interval has passed."""
        now = self.clock()
        self._swept_at = now
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._close(key, window, now)

    def flush(self) -> None:
        """Summarise and drop every window now (the owner is stopping)."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            self._close(key, window, now)

    @property
    def open_windows(self) -> int:
        return len(self._windows)

    def _close(self, key: tuple[str, str], window: _Window, now: float) -> None:
        del self._windows[key]
        if window.suppressed:
            peer, kind = key
            self.logger.log(
                window.level,
                "%d more like this (%s from %s) in the last %.1f s",
                window.suppressed,
                kind,
                peer,
                now - window.start,
            )
