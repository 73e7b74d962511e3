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
