"""The NBD benchmark runs end to end on a small file and writes complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
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
    from virtman.bench.nbd import tls_costs, with_tls_twins

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
