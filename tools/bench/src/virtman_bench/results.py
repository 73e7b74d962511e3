"""The result documents of boot-at-scale runs: one format for the testbed and the simulator.

It sits below both ``virtman_bench`` (which measures runs) and ``virtman_bench.sim`` (which
models them), so neither imports the other to share it.

    {"machine": {...}, "kind": "testbed" | "simulation", "command": "virtman bench ...",
     "settings": {...},
     "runs": [{"mode", "hosts", "vms_per_host", "all_booted_seconds", "mean_boot_seconds",
               "p99_boot_seconds", "single_vm_seconds", "origin_bytes_sent",
               "max_host_bytes_sent", ...more keys welcome}]}

``mode`` is a ``virtman.delivery.DeliveryMode`` value. Times are seconds, bytes are bytes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

RUN_KEYS = ("mode", "hosts", "vms_per_host", "all_booted_seconds", "mean_boot_seconds",
            "p99_boot_seconds", "single_vm_seconds", "origin_bytes_sent", "max_host_bytes_sent")


@dataclass
class Run:
    mode: str
    hosts: int
    vms_per_host: int
    all_booted_seconds: float
    mean_boot_seconds: float
    p99_boot_seconds: float
    single_vm_seconds: float
    origin_bytes_sent: int
    max_host_bytes_sent: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(doc.pop("extra"))
        return doc


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0]}


def write_results(path: str, kind: str, command: str, settings: dict[str, Any],
                  runs: list[Run]) -> dict[str, Any]:
    doc = {"machine": machine(), "kind": kind, "command": command, "settings": settings,
           "runs": [r.to_dict() for r in runs]}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return doc


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]
