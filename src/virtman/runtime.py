"""Process setup shared by the long-running commands: logging and the event loop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Coroutine
from typing import Any


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP call between services is wire traffic, not an operator event.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


#: glibc malloc settings for the data path (see ``tune_allocator``).
MALLOC_MMAP_THRESHOLD = 64 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep freed chunk buffers in the heap instead of handing them back to the kernel.

    Every chunk and READ reply is a fresh 64 KiB-4 MiB buffer. glibc serves such sizes
    with mmap (or trims them off the heap) and returns them to the kernel on free, so
    each one comes back as newly faulted, zeroed pages. Measured on the 2-core VM of
    this project: a 256 KiB pwrite into the page cache cost 300-600 us with the
    defaults and 60-90 us with these settings, which made a relay's cold fill 3x
    slower. No effect (and no error) on other C libraries.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (it is a dependency), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Coroutine[Any, Any, int]) -> int:
    tune_allocator()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
