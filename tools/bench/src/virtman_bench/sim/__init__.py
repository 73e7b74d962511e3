"""The discrete-event simulator of many hosts booting VMs from one image (see model.py)."""

from __future__ import annotations

from virtman_bench.sim.model import (
    MODES,
    BootPattern,
    SimConfig,
    SimResult,
    pattern_from_trace,
    profile_of,
    simulate,
    synthetic_pattern,
)

__all__ = [
    "MODES",
    "BootPattern",
    "SimConfig",
    "SimResult",
    "pattern_from_trace",
    "profile_of",
    "simulate",
    "synthetic_pattern",
]
