"""The discrete-event simulator of many hosts booting VMs from one image, or resuming them
from one bake (see model.py)."""

from __future__ import annotations

from virtman_bench.sim.model import (
    MODES,
    UVM_MODE,
    BootPattern,
    SimConfig,
    SimResult,
    UvmBudget,
    pattern_from_trace,
    profile_of,
    simulate,
    synthetic_pattern,
    uvm_budget,
)

__all__ = [
    "MODES",
    "UVM_MODE",
    "BootPattern",
    "SimConfig",
    "SimResult",
    "UvmBudget",
    "pattern_from_trace",
    "profile_of",
    "simulate",
    "synthetic_pattern",
    "uvm_budget",
]
