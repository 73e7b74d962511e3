"""A small scaling run on emulated hosts: results complete and consistent, nothing left behind."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from virtman.errors import ConfigError
from virtman_bench import scale
from virtman_bench.netbed import retransmitted_segments

CHUNK = 64 * 1024


def short_trace(path: Path) -> tuple[int, int]:
    """Aligned reads (no read-modify-write) over 24 MiB, a write and a flush; returns
    (bytes one VM reads, distinct chunks read)."""
    rng = random.Random(11)
    rows = ["t,op,offset,length"]
    read_bytes, chunks = 0, set()
    for i in range(120):
        offset = rng.randrange(0, 24 * 1024 * 1024 // 4096) * 4096
        length = rng.choice([4096, 65536])
        rows.append(f"{i * 0.01:.3f},read,{offset},{length}")
        read_bytes += length
        chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    rows.append("1.3,write,0,4096")
    rows.append("1.31,flush,0,0")
    path.write_text("\n".join(rows) + "\n")
    return read_bytes, len(chunks)


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("vmb")]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_small_scaling_run_is_complete_and_consistent(tmp_path: Path) -> None:
    before = leftover_namespaces()
    trace = tmp_path / "trace.csv"
    read_bytes, distinct_chunks = short_trace(trace)
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "scale", "--hosts", "2,3",
         "--modes", "star,paper,virtman", "--vms-per-host", "2", "--trace", str(trace),
         "--speed", "2", "--attach-delays", "0.5", "--chunk-size", "64K", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert leftover_namespaces() == before, "the benchmark left namespaces behind"
    doc = json.loads(out.read_text())
    assert doc["kind"] == "testbed" and doc["command"].startswith("virtman bench scale")
    runs = {(r["mode"], r["hosts"]): r for r in doc["runs"]}
    assert set(runs) == {(m, h) for m in ("star", "paper", "virtman") for h in (2, 3)}
    working_set = distinct_chunks * CHUNK
    for (mode, hosts), r in runs.items():
        assert r["vms_per_host"] == 2
        assert r["error_vms"] == 0 and r["io_errors"] == 0, (mode, hosts)
        assert 0 < r["mean_boot_seconds"] <= r["p99_boot_seconds"] <= r["all_booted_seconds"]
        assert r["working_set_bytes"] == working_set
        assert r["agents_cpu_seconds"] > 0 and r["vms_cpu_seconds"] > 0
        assert isinstance(r["tcp_retransmits"], int), "the TCP counters were not read"
        if mode != "star":
            # Level 1 feeds from the origin, level 2 (the third host) from level 1.
            levels = r["all_booted_by_level"]
            assert set(levels) == ({"1", "2"} if hosts == 3 else {"1"}), (mode, levels)
            assert max(levels.values()) == r["all_booted_seconds"]
        if mode == "star":
            # No cache: every VM fetches every byte it reads from the origin.
            assert r["origin_bytes_sent"] == hosts * 2 * read_bytes
        else:
            # Tree: the origin sends each chunk once per level-1 host (2 roots), and
            # level-2 hosts take everything from their parents.
            assert r["origin_bytes_sent"] == 2 * working_set
            if hosts == 3:
                assert r["max_host_bytes_sent"] >= working_set // 2
    # The paper's attach delay shows: its level-2 host waits 2 x 0.5 s before booting.
    assert runs[("paper", 3)]["all_booted_seconds"] > runs[("virtman", 3)]["all_booted_seconds"]


def test_dilation_stretches_times_and_slows_links() -> None:
    """--dilation D: think times and attach delays x D, link rates / D."""
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    args = parser.parse_args(
        ["--speed", "2", "--rate", "1gbit", "--attach-delays", "10,0", "--dilation", "4"]
    )
    plan = scale.plan_from_args(args)
    assert plan.speed == 0.5 and plan.attach_delays == [40.0, 0.0]
    assert plan.rate == "250000kbit" and plan.dilation == 4
    undilated = scale.plan_from_args(parser.parse_args(["--rate", "100mbit"]))
    assert undilated.rate == "100mbit" and undilated.speed == 1.0
    with pytest.raises(ConfigError, match=r"--dilation 0\.0: must be above zero"):
        scale.plan_from_args(parser.parse_args(["--dilation", "0"]))
    with pytest.raises(ConfigError, match="link rate 'fast'"):
        scale.plan_from_args(parser.parse_args(["--rate", "fast", "--dilation", "2"]))


SNMP = """\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1000
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets \
CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 40 12 0 3 2 5000 4800 17 0 6 0
Udp: InDatagrams NoPorts
Udp: 10 0
"""


def test_retransmitted_segments_reads_the_tcp_table() -> None:
    assert retransmitted_segments(SNMP) == 17
    with open("/proc/net/snmp", encoding="ascii") as f:  # this machine's own counters
        assert isinstance(retransmitted_segments(f.read()), int)
    assert retransmitted_segments("") is None  # `cat` failed: not "no retransmits"
    assert retransmitted_segments(SNMP.replace("RetransSegs", "Other")) is None
    assert retransmitted_segments("Tcp: RetransSegs\nTcp: x\n") is None
