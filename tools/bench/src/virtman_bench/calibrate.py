"""``virtman bench calibrate``: the simulator against the testbed, at the same settings.

For every run of a testbed result (``virtman bench scale``), the simulator is run with
the testbed's mode, hosts, VMs per host, trace, working set, chunk size, link rate, the
measured one-VM boot time as T and the paper's attach delay, and its time until all
VMs booted is compared with the measured one. The error of each run and the mean
absolute error per mode are printed and written as a simulation result document whose
runs carry ``testbed_all_booted_seconds`` and ``error_percent``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from virtman.errors import ConfigError
from virtman.replay.trace import load_trace
from virtman.sizes import parse_link_rate
from virtman_bench.results import Run, write_results
from virtman_bench.sim.model import SimConfig, pattern_from_trace, simulate

#: Image size of the testbed's generated image (the bundled trace reaches 4 GiB).
TESTBED_IMAGE_SIZE = 4 * 1024**3
#: Round trip between two testbed hosts: veth pairs through a bridge, no netem delay.
TESTBED_RTT = 0.0001


def sim_run_for(
    testbed: dict[str, Any], run: dict[str, Any], prefetch: bool | None = None
) -> Run:
    """The simulation of one testbed run. ``prefetch`` None: as the run did (its own
    ``prefetch`` key, else the document's setting; absent means off)."""
    settings = testbed["settings"]
    if prefetch is None:
        prefetch = bool(run.get("prefetch", settings.get("prefetch", False)))
    chunk = int(settings.get("chunk_size", 256 * 1024))
    trace = load_trace(settings.get("trace"))
    working_set = int(run.get("working_set_bytes") or trace.working_set(chunk))
    image_size = int(settings.get("image_size") or TESTBED_IMAGE_SIZE)
    boot = float(run["single_vm_seconds"])
    pattern = pattern_from_trace(trace, chunk, image_size, working_set, boot)
    mode = run["mode"]
    cfg = SimConfig(
        mode=mode,
        hosts=int(run["hosts"]),
        vms_per_host=int(run["vms_per_host"]),
        image_size=image_size,
        working_set=working_set,
        chunk_size=chunk,
        link_rate=parse_link_rate(str(settings.get("rate", "1gbit"))),
        rtt=TESTBED_RTT,
        boot_seconds=boot,
        attach_delay=float(run.get("attach_delay") or 0.0),
        parents=1 if mode == "paper" else 2,
        pattern=pattern,
        prefetch=prefetch and mode == "virtman",
        # The agent's children prefetch through their parents' prefetch export, whose
        # misses are background fetches all the way up: a parent's miss as prefetch.
        prefetch_miss=str(settings.get("prefetch_miss", "prefetch")),
        # A VM's miss on a chunk of a prefetch run in flight is served from that run.
        prefetch_demand=str(settings.get("prefetch_demand", "join")),
    )
    result = simulate(cfg).to_run()
    measured = float(run["all_booted_seconds"])
    result.extra.update(
        {
            "attach_delay": run.get("attach_delay"),
            "testbed_all_booted_seconds": measured,
            "error_percent": round(100 * (result.all_booted_seconds - measured) / measured, 1),
            "testbed_cpu_limited": run.get("cpu_limited"),
        }
    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("testbed", metavar="TESTBED.json", help="a virtman bench scale result")
    p.add_argument("--json", default="bench-calibration.json", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.testbed, encoding="utf-8") as f:
            testbed = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read testbed result {args.testbed}: {err}") from err
    if testbed.get("kind") != "testbed":
        raise ConfigError(f"{args.testbed} is not a testbed result (kind {testbed.get('kind')!r})")
    runs = []
    print(f"{'mode':<22}{'hosts':>6}{'testbed s':>11}{'simulated s':>13}{'error':>8}  cpu-limited")
    errors: dict[str, list[float]] = {}
    for tb in testbed["runs"]:
        if tb.get("all_booted_seconds") is None:
            continue
        sim = sim_run_for(testbed, tb)
        runs.append(sim)
        label = tb["mode"] + (
            f" (attach {tb['attach_delay']:g}s)"
            if tb.get("attach_delay") is not None and tb["mode"] == "paper"
            else ""
        )
        error = sim.extra["error_percent"]
        errors.setdefault(label, []).append(abs(error))
        print(
            f"{label:<22}{tb['hosts']:>6}{tb['all_booted_seconds']:>11.2f}"
            f"{sim.all_booted_seconds:>13.2f}{error:>7.1f}%  "
            f"{'yes' if tb.get('cpu_limited') else ''}"
        )
    for label, values in errors.items():
        print(f"mean absolute error, {label}: {sum(values) / len(values):.1f}%")
    command = "virtman bench calibrate " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    write_results(
        args.json,
        "simulation",
        command,
        {"calibrated_against": args.testbed, "network": "switch", "rtt": TESTBED_RTT},
        runs,
    )
    print(f"wrote {args.json}")
    return 0
