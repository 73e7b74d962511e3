"""The NBD benchmark runs end to end on a small file and writes complete JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import require


def test_bench_nbd_small_run_writes_results(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdcopy", "fio")
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "nbd", "--size", "32M", "--repeat", "1",
         "--seconds", "1", "--ramp-seconds", "0", "--numjobs", "1", "--no-single-conn",
         "--servers", "qemu-nbd,virtman,virtman-relay", "--tmpdir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["file_size"] == 32 * 1024 * 1024
    assert set(doc["results"]) == {"qemu-nbd", "virtman", "virtman-relay"}
    for name, result in doc["results"].items():
        assert result["seq_mb_s"] > 0 and result["iops_4k"] > 0, name
    assert doc["results"]["qemu-nbd"]["seq_ratio"] == 1.0
    assert doc["machine"]["cpu_count"] >= 1
    assert not list(tmp_path.glob("vmbench-*")), "benchmark left its temp dir behind"


def test_with_tls_twins_and_costs() -> None:
    from virtman_bench.nbd import tls_costs, with_tls_twins

    assert with_tls_twins(["qemu-nbd", "virtman", "virtman-relay"]) == [
        "qemu-nbd", "virtman", "virtman+tls", "virtman-relay", "virtman-relay+tls"]
    results = {
        "virtman": {"seq_mb_s": 800.0, "seq_mb_s_1conn": 400.0, "iops_4k": 40000.0},
        "virtman+tls": {"seq_mb_s": 400.0, "seq_mb_s_1conn": 100.0, "iops_4k": 30000.0},
        "virtman-relay+tls": {"seq_mb_s": 1.0, "iops_4k": 1.0},  # no plaintext twin
    }
    assert tls_costs(results) == {
        "virtman+tls": {"seq": 0.5, "seq_1conn": 0.25, "iops_4k": 0.75}}


def test_bench_nbd_tls_measures_tls_beside_plaintext(tmp_path: Path) -> None:
    require("nbdcopy", "fio")
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "nbd", "--size", "16M", "--repeat", "1",
         "--seconds", "1", "--ramp-seconds", "0", "--numjobs", "1", "--no-single-conn",
         "--servers", "virtman", "--tls", "--tmpdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["virtman", "virtman+tls"]
    tls = doc["results"]["virtman+tls"]
    assert tls["uri"].startswith("nbds+unix:///bench?socket=") and "tls-certificates=" in tls["uri"]
    assert tls["seq_mb_s"] > 0 and tls["iops_4k"] > 0
    assert doc["tls_vs_plaintext"]["virtman+tls"]["seq"] > 0
    assert "TLS against plaintext" in run.stdout
    assert any("--tls-cert" in c for c in doc["commands"])


def test_relay_comparison_ratios() -> None:
    from virtman_bench.nbd import format_relay_comparison, relay_comparison

    peer = {"cold_mb_s": 400.0, "seq_mb_s": 1000.0, "iops_4k": 50000.0, "cpu_s_per_gib": 2.0,
            "cpu_s_per_gib_cold": 4.0, "cpu_s_per_gib_warm": 1.0}
    ours = {"cold_mb_s": 600.0, "seq_mb_s": 500.0, "iops_4k": 50000.0, "cpu_s_per_gib": 1.0,
            "cpu_s_per_gib_cold": 2.0, "cpu_s_per_gib_warm": 1.5}
    versus = relay_comparison({"virtman-relay": ours, "nbdkit-relay": peer})
    assert versus == {"cold": 1.5, "warm": 0.5, "iops_4k": 1.0, "cpu_per_gib": 0.5,
                      "cpu_per_gib_cold": 0.5, "cpu_per_gib_warm": 1.5}
    assert format_relay_comparison(versus).startswith(
        "virtman-relay vs nbdkit-relay: cold 1.50x, warm 0.50x, 4k 1.00x, CPU/GiB 0.50x")
    assert relay_comparison({"virtman-relay": ours}) is None
    assert relay_comparison({"virtman-relay": ours, "nbdkit-relay": {"error": "died"}}) is None


def test_process_cpu_seconds_counts_a_busy_child() -> None:
    from virtman_bench.nbd import process_cpu_seconds

    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ninput()"],
                             stdin=subprocess.PIPE)
    try:
        before = process_cpu_seconds(child.pid)
        deadline = time.monotonic() + 30
        while process_cpu_seconds(child.pid) - before < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_cpu_seconds(child.pid) >= 0.2
    finally:
        child.kill()
        child.wait()


def test_bench_nbd_relays_against_nbdkit_cache(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdkit", "nbdcopy", "fio")
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "nbd", "--size", "16M", "--repeat", "2",
         "--seconds", "1", "--ramp-seconds", "0", "--numjobs", "1", "--no-single-conn",
         "--servers", "virtman-relay,nbdkit-relay", "--tmpdir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["virtman-relay", "nbdkit-relay"]
    for name, result in doc["results"].items():
        assert result["cold_mb_s"] > 0 and result["seq_mb_s"] > 0, name
        assert result["iops_4k"] > 0 and result["cpu_s_per_gib"] >= 0, name
    versus = doc["relay_vs_nbdkit"]
    assert versus["cold"] > 0 and versus["warm"] > 0 and versus["iops_4k"] > 0
    assert re.search(r"virtman-relay vs nbdkit-relay: cold \d+\.\d\dx, warm \d+\.\d\dx, "
                     r"4k \d+\.\d\dx, CPU/GiB (\d+\.\d\d|n/a)x", run.stdout), run.stdout
    # Two cold fills per relay (--repeat 2), each by a fresh relay over an empty cache.
    assert len(re.findall(r"relay cold read \(cache fill\): [\d,]+ MB/s \(runs: [\d,]+, [\d,]+\)",
                          run.stdout)) == 2, run.stdout
    # Both relays read the same origin: a qemu-nbd, started once for each.
    origins = [c for c in doc["commands"] if c.startswith("qemu-nbd ")]
    assert len(origins) == 2, doc["commands"]
    assert any("--filter=cache" in c and "cache-on-read=true" in c for c in doc["commands"])
    assert not list(tmp_path.glob("vmbench-*")), "benchmark left its temp dir behind"
