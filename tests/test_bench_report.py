"""The benchmark report: figures and a Markdown page from testbed and simulation results."""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from virtman.errors import ConfigError, VirtmanError
from virtman_bench.report import _scenarios, add_arguments, load, make_report, run

MIB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TESTBED_COMMAND = "virtman bench scale --hosts 1,2,4,8 --vms-per-host 2 --json scale.json"
SIM_COMMAND = "virtman bench simulate --hosts 1,10,100,1000,10000 --json sim.json"
MACHINE = {"cpu": "Test CPU 3000", "cores": 8, "kernel": "6.1.0", "python": "3.11.9"}


def _run(mode: str, hosts: int, booted: float | None, origin: int | None,
         **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "hosts": hosts, "vms_per_host": 2, "all_booted_seconds": booted,
            "mean_boot_seconds": None if booted is None else booted * 0.8,
            "p99_boot_seconds": None if booted is None else booted * 0.95,
            "single_vm_seconds": 10.0, "origin_bytes_sent": origin,
            "max_host_bytes_sent": None if origin is None else origin // max(1, hosts // 2),
            **extra}


def _testbed_doc() -> dict[str, Any]:
    ws = 64 * MIB
    runs = []
    for hosts in (1, 2, 4, 8):
        runs.append(_run("star", hosts, 10.0 + 4 * hosts, hosts * 2 * ws))
        runs.append(_run("copy", hosts, 30.0 + 6 * hosts, hosts * 4 * ws))
        runs.append(_run("paper", hosts, 22.0 + hosts, min(hosts, 2) * ws, attach_delay=10))
        if hosts < 8:
            runs.append(_run("paper", hosts, 12.0 + hosts, min(hosts, 2) * ws, attach_delay=0))
        runs.append(_run("virtman", hosts, 11.0 + hosts / 2, min(hosts, 2) * ws, depth=2))
    # The 0 s attach variant failed at 8 hosts: no times, no byte counts.
    runs.append(_run("paper", 8, None, None, attach_delay=0, error="timeout after 600 s",
                     error_vms=16))
    return {"machine": MACHINE, "kind": "testbed", "command": TESTBED_COMMAND,
            "settings": {"vms_per_host": 2, "link_mbps": 1000, "fanout": 2,
                         "trace": "/srv/traces/ubuntu-22.04.csv", "working_set_bytes": ws},
            "runs": runs}


def _simulation_doc() -> dict[str, Any]:
    ws = 100 * MIB
    runs = []
    for hosts in (1, 10, 100, 1000, 10000):
        floor = 10.0 + hosts.bit_length()
        common = {"floor_seconds": floor, "working_set_bytes": ws, "trace": "ubuntu.csv"}
        runs.append(_run("star", hosts, floor + hosts * 0.8, hosts * ws, **common))
        runs.append(_run("copy", hosts, floor + hosts * 2.0, hosts * 4 * ws, **common))
        runs.append(_run("paper", hosts, floor * 1.5, 2 * ws, **common, cpu_limited=True))
        runs.append(_run("virtman", hosts, floor * 1.25, min(hosts, 4) * ws, **common,
                         depth=max(1, hosts.bit_length() // 2)))
    return {"machine": MACHINE, "kind": "simulation", "command": SIM_COMMAND,
            "settings": {"link_gbit": 10, "fanout": 4, "seed": 1}, "runs": runs}


def _write(tmp_path: Path) -> list[str]:
    paths = []
    for name, doc in (("scale.json", _testbed_doc()), ("sim.json", _simulation_doc())):
        path = tmp_path / name
        path.write_text(json.dumps(doc), encoding="utf-8")
        paths.append(str(path))
    return paths


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])
    assert width == 900 and height >= 600, (path, width, height)
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes"


def _image_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", md)


# One figure per scenario, named after its document: scale.json and sim.json.
FIGURES = {"scale.png", "sim.png"}


def test_report_writes_figures_and_page(tmp_path: Path) -> None:
    docs = load(_write(tmp_path))
    assert docs[0]["source"].endswith("scale.json")
    out_dir, md_path = tmp_path / "docs" / "figures", tmp_path / "docs" / "scaling.md"
    written = make_report(docs, str(out_dir), str(md_path), "Scaling test")

    assert {Path(p).name for p in written} == FIGURES | {"scaling.md"}
    for name in FIGURES:
        _check_png(out_dir / name)
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Scaling test\n")
    assert "How to read" in md
    assert TESTBED_COMMAND in md and SIM_COMMAND in md
    assert "Test CPU 3000" in md and "link_mbps" in md and "link 1000 Mbit/s" in md
    for label in ("star", "copy", "paper (10 s attach)", "paper (0 s attach)", "virtman"):
        assert f"#### {label}\n" in md, label
    assert "#### paper\n" in md  # the simulation's paper mode has no attach delay

    # Testbed, virtman at 4 hosts: 13 s all booted / 10 s one VM = 1.30; origin 128 MiB is
    # 2.00 working sets (64 MiB, from the settings); the most one host sent: 64 MiB.
    assert "| 4 | 13.00 | 10.40 | 12.35 | 1.30 | 128.0 | 2.00 | 64.0 | 2 |" in md
    # Simulation, virtman at 1000 hosts: floor 10 + 10 = 20 s, all booted 25 s: ratio 1.25;
    # origin 4 working sets of 100 MiB.
    assert "| 1000 | 25.00 | 20.00 | 23.75 | 2.50 | 400.0 | 4.00 | 0.8 | 20.00 | 1.25 | 5 |" in md
    # Star at 10000 hosts crosses 100 s: one decimal from there.
    assert "| 10000 | 8024.0 |" in md
    assert "CPU-limited" in md

    # The failed run is in its table with dashes, and said to be left out of the figures.
    assert "| 8 | — | — | — | — | — | — | — |" in md
    assert ("paper (0 s attach) at 8 hosts: no time until all booted and no origin byte count"
            " (error: timeout after 600 s)") in md

    links = _image_links(md)
    assert {Path(link).name for link in links} == FIGURES
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("figures/")
        assert (md_path.parent / link).resolve().is_file(), link


def test_report_is_deterministic(tmp_path: Path) -> None:
    docs = load(_write(tmp_path))
    first = make_report(docs, str(tmp_path / "a"), str(tmp_path / "a.md"), "T")
    second = make_report(docs, str(tmp_path / "b"), str(tmp_path / "b.md"), "T")
    for a, b in zip(first[:-1], second[:-1], strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes(), a
    assert (tmp_path / "a.md").read_text().replace("a/", "b/") == (tmp_path / "b.md").read_text()


def test_cli_run_with_page_outside_the_figure_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    md_path = tmp_path / "site" / "page.md"
    args = parser.parse_args([*paths, "--out-dir", str(tmp_path / "figs"),
                              "--markdown", str(md_path), "--title", "From the CLI"])
    assert run(args) == 0
    printed = capsys.readouterr().out.split()
    assert str(md_path) in printed and len(printed) == len(FIGURES) + 1
    for name in FIGURES:
        _check_png(tmp_path / "figs" / name)
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# From the CLI\n")
    links = _image_links(md)
    assert len(links) == len(FIGURES)
    for link in links:
        assert link.startswith("../figs/")
        assert (md_path.parent / link).resolve().is_file(), link


def test_cli_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["r.json"])
    assert (args.results, args.out_dir, args.markdown) == (
        ["r.json"], "docs/figures", "docs/scaling.md")
    assert args.title


def test_sparse_runs_and_failed_modes(tmp_path: Path) -> None:
    """Only the required keys, a mode with nothing measured, runs without hosts."""
    doc = {"kind": "testbed", "command": "virtman bench scale", "runs": [
        {"mode": "star", "hosts": 1, "all_booted_seconds": 12.5},
        {"mode": "star", "hosts": 2, "all_booted_seconds": 20.0},
        {"mode": "virtman", "hosts": 1, "all_booted_seconds": None, "origin_bytes_sent": None},
        {"mode": "copy", "all_booted_seconds": 3.0},
        {"hosts": 3, "all_booted_seconds": "fast"},
    ]}
    written = make_report([doc], str(tmp_path / "f"), str(tmp_path / "r.md"), "Sparse")
    assert [Path(p).name for p in written] == ["scale.png", "r.md"]
    _check_png(tmp_path / "f" / "scale.png")
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "virtman at 1 hosts: no time until all booted" in md
    assert "copy: a run without a host count" in md
    assert "#### unknown" in md
    assert "| 2 | 20.00 | — | — | — | — | — | — | — |" in md


def test_nothing_to_plot(tmp_path: Path) -> None:
    doc = {"kind": "simulation", "runs": [{"mode": "star", "hosts": 4}]}
    written = make_report([doc], str(tmp_path / "f"), str(tmp_path / "r.md"), "Empty")
    assert [Path(p).name for p in written] == ["r.md"]
    assert "nothing to plot" in (tmp_path / "r.md").read_text(encoding="utf-8")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(VirtmanError, match="cannot read"):
        load([str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        load([str(bad)])
    other = tmp_path / "other.json"
    other.write_text('{"results": {}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="not a benchmark result"):
        load([str(other)])
    with pytest.raises(ConfigError):
        make_report([], str(tmp_path), str(tmp_path / "r.md"), "T")


def _scale_doc(command: str, slow: float) -> dict[str, Any]:
    """Shaped like ``virtman bench scale`` output: tc link settings, ``attach_delay`` None
    outside paper mode, the working set and the trace's name in every run."""
    runs = []
    for hosts in (1, 2, 4):
        for mode, attach in (("star", None), ("paper", 10.0), ("paper", 0.0), ("virtman", None)):
            runs.append(_run(mode, hosts, slow * (9.0 + hosts), hosts * 32 * MIB,
                             attach_delay=attach, error_vms=0, working_set_bytes=32 * MIB,
                             cpu_limited=False, trace="ubuntu-boot", rate="1gbit"))
    settings = {"modes": ["star", "paper", "virtman"], "hosts": [1, 2, 4], "vms_per_host": 2,
                "speed": 1.0, "trace": None, "working_set": None, "attach_delays": [10.0, 0.0],
                "rate": "1gbit", "delay": "0.2ms", "delay_applied": False}
    return {"machine": MACHINE, "kind": "testbed", "command": command, "settings": settings,
            "runs": runs}


def test_two_testbed_documents_of_one_setting_share_a_figure(tmp_path: Path) -> None:
    docs = [_scale_doc("virtman bench scale --hosts 1,2,4", 1.0),
            _scale_doc("virtman bench scale --hosts 1,2,4 --rate 10gbit", 1.5)]
    md_path = tmp_path / "scaling.md"
    written = make_report(docs, str(tmp_path / "figures"), str(md_path), "Two runs")
    assert sorted(Path(p).name for p in written) == ["scale.png", "scaling.md"]
    for path in written[:-1]:
        _check_png(Path(path))
    md = md_path.read_text(encoding="utf-8")
    assert "Settings: 2 VMs per host, link 1gbit, delay 0.2ms (not applied), trace ubuntu-boot." \
        in md
    assert "### Document 1" in md and "### Document 2" in md
    assert all(d["command"] in md for d in docs)
    assert md.count("#### paper (10 s attach)\n") == 2 and md.count("#### star\n") == 2
    assert "| `delay_applied` | false |" in md
    # Second document, 4 hosts: 1.5 x 13 s = 19.5 s against 10 s alone; 4 working sets.
    assert "| 4 | 19.50 | 15.60 | 18.52 | 1.95 | 128.0 | 4.00 |" in md
    assert "Left out of the figures" not in md


def test_levels_cpu_and_dilation_are_reported(tmp_path: Path) -> None:
    """Per-level times and CPU seconds become columns; a dilated run says so in the
    settings line and gets a figure of its own."""
    doc = _scale_doc("virtman bench scale --dilation 4", 4.0)
    doc["settings"]["dilation"] = 4.0
    for r in doc["runs"]:
        r["all_booted_by_level"] = {"2": r["all_booted_seconds"], "1": 40.0}
        r["agents_cpu_seconds"], r["vms_cpu_seconds"] = 12.5, 8.0
    written = make_report([doc], str(tmp_path / "f"), str(tmp_path / "r.md"), "Dilated")
    assert [Path(p).name for p in written] == ["scale.png", "r.md"]
    _check_png(tmp_path / "f" / "scale.png")
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "time dilation \u00d74" in md
    assert "| all booted by tree level (s) | CPU s: agents / VMs |" in md
    # virtman at 4 hosts: 4 x 13 s = 52 s, 5.2 times one VM alone.
    assert "| 4 | 52.00 | 41.60 | 49.40 | 5.20 |" in md
    assert "| 1: 40.00, 2: 52.00 | 12.5 / 8.0 |" in md


def test_each_setting_gets_its_own_figure_and_calibrations_join_their_testbed(
    tmp_path: Path,
) -> None:
    fast = _scale_doc("virtman bench scale --hosts 1,2,4", 1.0)
    slow = _scale_doc("virtman bench scale --hosts 1,2,4 --rate 10mbit", 3.0)
    slow["settings"]["rate"] = "10mbit"
    fast["source"], slow["source"] = "results/scale-fast.json", "results/scale-slow.json"
    calibration = _simulation_doc()
    calibration["settings"] = {"calibrated_against": "/elsewhere/scale-slow.json"}
    calibration["source"] = "results/calibration-slow.json"
    md_path = tmp_path / "scaling.md"
    written = make_report([fast, slow, calibration], str(tmp_path / "f"), str(md_path), "T")
    assert [Path(p).name for p in written] == ["scale-fast.png", "scale-slow.png", "scaling.md"]

    scenarios = _scenarios([fast, slow, calibration])
    assert [[n for n, _ in sc.docs] for sc in scenarios] == [[1], [2, 3]]
    labels = [s.label for s in scenarios[1].series]
    assert "virtman, measured" in labels and "virtman, simulated" in labels
    assert "paper (10 s attach), measured" in labels
    assert not any("doc" in label for sc in scenarios for s in sc.series for label in [s.label])
    simulated = next(s for s in scenarios[1].series if s.label == "virtman, simulated")
    measured = next(s for s in scenarios[1].series if s.label == "virtman, measured")
    assert simulated.color == measured.color and simulated.linestyle != measured.linestyle
    md = md_path.read_text(encoding="utf-8")
    assert "## Scenario 2, scale-slow: testbed and its calibrated simulation" in md
    assert "document 3 (simulation, calibrated against scale-slow.json)" in md


def test_lines_of_one_mode_are_told_apart_by_their_options() -> None:
    docs = [_scale_doc("virtman bench scale --hosts 1,2,4 --json a.json", 1.0),
            _scale_doc("virtman bench scale --hosts 1,2 --speed 2 --json b.json", 1.5)]
    (scenario,) = _scenarios(docs)
    labels = [s.label for s in scenario.series if s.mode == "virtman"]
    assert labels == ["virtman (without --speed 2)", "virtman (--speed 2)"]


def test_report_without_matplotlib_says_how_to_install_it(tmp_path: Path) -> None:
    path = _write(tmp_path)[0]
    # matplotlib is made unimportable in a child, as on an install without the extra.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from virtman.cli.main import main\n"
            "main(['--version'])\n")  # builds every subcommand's parser, then exits 0
    version = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=False)
    assert version.returncode == 0 and "virtman" in version.stdout, version.stderr
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from virtman.cli.main import main\n"
            f"sys.exit(main(['bench', 'report', {path!r}, '--out-dir', {str(tmp_path)!r},"
            f" '--markdown', {str(tmp_path / 'r.md')!r}]))\n")
    report = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert report.returncode == 2, report.stderr
    assert "pip install ./tools/bench" in report.stderr and "Traceback" not in report.stderr
