"""``virtman bench calibrate``: the simulator against the testbed, at the same settings.

For every run of a testbed result (``virtman bench scale``), the simulator is run with
the testbed's mode, hosts, VMs per host, trace, working set, chunk size, link rate, the
measured one-VM boot time as T and the paper's attach delay, and its time until all
VMs booted is compared with the measured one. The error of each run and the mean
absolute error per mode are printed and written as a simulation result document whose
runs carry ``testbed_all_booted_seconds`` and ``error_percent``.

A run of mode ``uvm`` (µVMs resumed from one bake; its ``all_booted_seconds`` is the time
all were running) is simulated in the simulator's uvm mode from the measured inputs:
state and layer bytes, one VM's resume time, hosts, VMs per host, link rate, cores
(``uvm_measurement``, ``sim_uvm_run``, which the lead can also call directly).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from virtman.errors import ConfigError
from virtman.replay.trace import load_trace
from virtman.sizes import parse_link_rate
from virtman_bench.results import Run, write_results
from virtman_bench.sim.model import UVM_MODE, SimConfig, pattern_from_trace, simulate

#: Image size of the testbed's generated image (the bundled trace reaches 4 GiB).
TESTBED_IMAGE_SIZE = 4 * 1024**3
#: Round trip between two testbed hosts: veth pairs through a bridge, no netem delay.
TESTBED_RTT = 0.0001


@dataclass(frozen=True)
class UvmMeasurement:
    """A testbed run of µVMs: the inputs the simulator's uvm mode needs, and the time
    measured until every VM was running."""

    hosts: int
    vms_per_host: int
    #: The bake's state as it streamed (bytes of the migration stream) and its layer.
    state_bytes: int
    layer_bytes: int
    #: One VM's resume from a locally cached state (the median ``virtman bench uvm``
    #: prints), on an otherwise idle host.
    resume_seconds: float
    #: Every link's rate, bytes per second.
    link_rate: float
    all_running_seconds: float
    #: Cores per host the resuming VMs share. The testbed's hosts share one machine,
    #: so ``uvm_measurement`` divides its cores by the hosts.
    cores: float = 1.0
    chunk_size: int = 256 * 1024
    fanout: int = 2
    parents: int = 2
    rtt: float = TESTBED_RTT
    #: As for boots (``sim_run_for``): the agent serves a read of a chunk that a
    #: prefetch run is fetching from that run, and a parent's miss as prefetch.
    prefetch_demand: str = "join"
    prefetch_miss: str = "prefetch"


def sim_uvm_run(m: UvmMeasurement) -> Run:
    """The simulator's uvm mode at a measured run's inputs, with the error per run
    (``error_percent``: simulated over measured, less one, in percent)."""
    cfg = SimConfig(
        mode=UVM_MODE, hosts=m.hosts, vms_per_host=m.vms_per_host,
        chunk_size=m.chunk_size, link_rate=m.link_rate, rtt=m.rtt, fanout=m.fanout,
        parents=m.parents, state_bytes=m.state_bytes, layer_bytes=m.layer_bytes,
        resume_seconds=m.resume_seconds, cores=m.cores,
        prefetch_demand=m.prefetch_demand, prefetch_miss=m.prefetch_miss,
    )
    result = simulate(cfg).to_run()
    measured = m.all_running_seconds
    result.extra.update({
        "testbed_all_booted_seconds": measured,
        "error_percent": round(100 * (result.all_booted_seconds - measured) / measured, 1),
    })
    return result


def uvm_measurement(testbed: dict[str, Any], run: dict[str, Any]) -> UvmMeasurement:
    """The inputs of a testbed uvm run: each key from the run, else from the document's
    settings. Needs ``state_bytes``, ``layer_bytes`` and ``resume_seconds`` (else the
    run's ``single_vm_seconds``: one µVM alone); ``cores`` defaults to the machine's
    cores over the hosts."""
    settings = testbed.get("settings", {})

    def get(key: str, default: Any = None) -> Any:
        value = run.get(key, settings.get(key, default))
        if value is None:
            raise ConfigError(f"testbed uvm run at {run.get('hosts')} hosts has no {key!r}")
        return value

    hosts = int(run["hosts"])
    machine_cores = testbed.get("machine", {}).get("cores") or 1
    return UvmMeasurement(
        hosts=hosts,
        vms_per_host=int(run["vms_per_host"]),
        state_bytes=int(get("state_bytes")),
        layer_bytes=int(get("layer_bytes")),
        resume_seconds=float(get("resume_seconds", run.get("single_vm_seconds"))),
        link_rate=parse_link_rate(str(settings.get("rate", "1gbit"))),
        all_running_seconds=float(run["all_booted_seconds"]),
        cores=float(get("cores", machine_cores / hosts)),
        chunk_size=int(settings.get("chunk_size", 256 * 1024)),
        prefetch_demand=str(settings.get("prefetch_demand", "join")),
        prefetch_miss=str(settings.get("prefetch_miss", "prefetch")),
    )


def sim_run_for(
    testbed: dict[str, Any], run: dict[str, Any], prefetch: bool | None = None
) -> Run:
    """The simulation of one testbed run. ``prefetch`` None: as the run did (its own
    ``prefetch`` key, else the document's setting; absent means off). A uvm run is
    simulated in uvm mode (``sim_uvm_run``; its bake is always prefetched)."""
    if run["mode"] == UVM_MODE:
        return sim_uvm_run(uvm_measurement(testbed, run))
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
