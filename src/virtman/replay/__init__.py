"""Boot-trace replay: stand-in VMs that read and write like a booting guest."""

from __future__ import annotations

from virtman.replay.replayer import ReplayResult, replay
from virtman.replay.trace import Trace, TraceRequest, load_trace, parse_trace

__all__ = ["ReplayResult", "Trace", "TraceRequest", "load_trace", "parse_trace", "replay"]
