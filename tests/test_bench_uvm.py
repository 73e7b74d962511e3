"""``virtman bench uvm`` end to end, small: a real three-agent cluster, TCG, one bake.

The figures must be measured, not made up: the state's bytes are the ones the agent
saved and every hop of the tree counted, the resuming host really sits two levels down,
a live migration's bytes add up to its parts, and the simulator ran at the measured
inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from virtman.limits import BAKE_STATE_CHUNK_BYTES
from virtman_bench.calibrate import UvmMeasurement, sim_uvm_run

#: Seconds the run may take on two busy cores: a TCG boot to the bake's third tick and
#: a cold boot (~20 s each), the state digested by Volt, a few resumes, one migration.
RUN_SECONDS = 400
#: The guest's memory: Debian's initrd does not unpack in 256 MiB.
MEMORY_MIB = 384
SECTOR = 4096


@pytest.mark.timeout(RUN_SECONDS + 30)
def test_bench_uvm_prints_every_target_from_measured_figures(tmp_path: Path) -> None:
    require("qemu-system-x86_64", "mkfs.ext4", "debugfs", "nbdcopy")
    out = tmp_path / "uvm.json"
    done = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "uvm", "--resumes", "2", "--at-once", "2",
         "--migrations", "1", "--memory", str(MEMORY_MIB), "--json", str(out),
         "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=RUN_SECONDS, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for target in ("resume from a locally cached state", "state cold through a two-level tree",
                   "live migration downtime", "memory + written blocks only"):
        assert any(line.startswith("target: ") and target in line
                   for line in done.stdout.splitlines()), done.stdout
    doc = json.loads(out.read_text())
    assert doc["accel"] == "tcg" and doc["memory_mib"] == MEMORY_MIB
    cl = doc["cluster"]

    # The state: what the agent saved, padded to whole sectors, is the image Volt
    # registered; a booted guest's memory, not a stub.
    bake = cl["bake"]
    assert bake["state_bytes"] > 16 * 1024 * 1024
    assert bake["state_image_bytes"] == -(-bake["state_bytes"] // SECTOR) * SECTOR

    # The cold resume: level 2 under host2, and every byte of the state passed through
    # host2, which had it from the origin (the baking host's export).
    cold = cl["cold_tree"]
    assert cold["level"] == 2 and cold["parents"] == ["host2"]
    state = bake["state_image_bytes"]
    assert cold["bytes_received"]["host2"] == state
    assert cold["relay_bytes_received"] == {"origin": state}
    assert cold["relay_bytes_sent"] == state
    tree = next(t for t in cold["trees"] if t["image"] == "uvm.state")
    assert tree["depth"] == 2
    assert [(n["agent"], n["level"]) for n in tree["nodes"]] == [("host2", 1), ("host3", 2)]
    assert 0 < cold["resume_seconds"] <= cold["sized_seconds"]
    assert cold["all_running_seconds"] == max(cold["resume_seconds"],
                                              cold["level1_resume_seconds"])

    # The simulator ran at this run's measured inputs: the same call gives its figure.
    (sim,) = doc["calibration"]
    again = sim_uvm_run(UvmMeasurement(
        hosts=2, vms_per_host=1, state_bytes=state,
        layer_bytes=max(cold["layer_bytes_received"], 1),
        resume_seconds=cl["cached"]["median"], link_rate=sim["link_rate"],
        all_running_seconds=cold["all_running_seconds"], cores=sim["cores"],
        chunk_size=BAKE_STATE_CHUNK_BYTES, fanout=1, parents=1))
    assert sim["simulated_seconds"] == round(again.all_booted_seconds, 3) > 0
    assert sim["measured_seconds"] == cold["all_running_seconds"]
    assert sim["error_percent"] == again.extra["error_percent"]
    assert "simulated vs measured, cold pair" in done.stdout

    assert len(cl["cached"]["resume_seconds"]) == 2 and cl["cached"]["min"] > 0
    assert cl["at_once"]["hosts"] == ["host2", "host3"]
    assert len(cl["at_once"]["resume_seconds"]) == 2
    assert cl["at_once"]["all_answered_seconds"] >= cl["at_once"]["max"]
    assert cl["cold_boot_seconds"] > cl["cached"]["median"]

    # The migration: bytes moved are its memory and the blocks the VM wrote, no more.
    (move,) = cl["migrations"]
    assert (move["from"], move["to"]) == ("host3", "host2")
    assert move["bytes_moved"] == move["ram_bytes"] + move["disk_bytes"] + move["live_read_bytes"]
    assert 0 < move["disk_bytes"] <= move["written_bytes"]
    assert 16 * 1024 * 1024 < move["ram_bytes"] < MEMORY_MIB * 1024 * 1024
    assert {t["target"].split(",")[0] for t in doc["targets"]} >= {
        "resume from a locally cached state", "live migration moves memory + written blocks only"}
    assert list(tmp_path.glob("virtman-uvm-*")) == []  # its work directory is gone
