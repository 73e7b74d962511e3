"""``virtman bench store --bakes``: real bakes of the test guest (QEMU, TCG) in a fresh host
store, their bytes per bake, and a resume from a private mapping of a bake's RAM file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from conftest import require

from virtman_bench.store import add_arguments, run

MEMORY_MIB = 384


@pytest.mark.timeout(300)
def test_bakes_with_ram_in_a_file_are_measured_and_one_resumes(tmp_path: Path) -> None:
    require("qemu-system-x86_64", "mkfs.ext4", "debugfs")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "store.json"
    work = tmp_path / "work"
    work.mkdir()
    args = parser.parse_args(["--bakes", "--bake-cpus", "1,2", "--bake-memory", str(MEMORY_MIB),
                              "--format", "ramfile", "--check-resume", "--workdir", str(work),
                              "--json", str(out)])
    assert run(args) == 0
    doc = json.loads(out.read_text())
    # Two bakes, each a device state and a RAM file of the guest's size, all read back equal.
    kinds = [os.path.basename(r["file"]) for r in doc["runs"]]
    assert kinds == ["m384-c1.device", "m384-c1.ram", "m384-c2.device", "m384-c2.ram"]
    assert all(r["verified"] for r in doc["runs"])
    rams = [r for r in doc["runs"] if r["file"].endswith(".ram")]
    assert [r["raw_bytes"] for r in rams] == [MEMORY_MIB << 20] * 2
    # Stored compressed: one bake takes far less than its RAM's non-zero bytes.
    first, second = (b["disk_bytes"] for b in doc["bakes"])
    assert 0 < first < rams[0]["data_bytes"] and first <= second
    # The bake resumed from a private mapping of its RAM file goes on counting.
    (check,) = doc["resume_checks"]
    assert check["ok"] and check["first_resumed_tick"] == check["last_baked_tick"] + 1, check
    assert os.listdir(work) == []  # the bakes and the store were removed
