"""``virtman bench scale``: boot time against host count, per delivery mode, on emulated hosts.

Theory of operation
-------------------
The command (as root) builds a ``Netbed``: one network namespace per host, origin and
Volt, links shaped with tc. It then runs itself again as a *worker* inside the origin's
namespace, so the controller and the origin share a host and nothing runs in the root
namespace. For every mode and host count the worker starts a fresh cluster (Volt and
one agent per host, each in its namespace, all agents in that mode), registers the
image, and at one instant t0 creates every VM and replays the boot trace through it;
a VM's boot time runs from t0 to its last reply, so whatever a mode spends before
the boot (copying the image, attaching level by level) counts. The namespaces, links
and processes are removed at the end, on error and on Ctrl-C or SIGTERM.

Modes: ``star`` (every VM reads the origin, no cache), ``copy`` (each host copies the
whole image first), ``paper`` (binary tree, one parent, a node attaches after its
parent, ``attach_delay`` seconds per level), ``virtman`` (this project's defaults).

Time dilation (``--dilation D``): every emulated duration grows D times (think times,
attach delays, heartbeat interval and timeout, and link rates divided by D, so
transfers take D times longer) while the
CPU stays as it is; the run then behaves as on a machine with D times the CPU. It is
how a run that this machine's cores limit is made to measure the system instead; times
come out D times longer, and ratios (all booted over one VM alone) are unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.cluster.up import generate_image, single_vm_seconds
from virtman.delivery import MODE_NAMES as MODES
from virtman.errors import ConfigError, NetworkError
from virtman.limits import HEARTBEAT_INTERVAL_SECONDS, HEARTBEAT_TIMEOUT_SECONDS
from virtman.planner.profile import profile_from_trace
from virtman.replay.fleet import FleetProcess, FleetSpec
from virtman.replay.trace import Trace, format_trace, load_trace
from virtman.sizes import format_size, parse_link_rate, parse_size
from virtman_bench.netbed import LinkShape, Netbed, check_namespaces_work
from virtman_bench.results import Run, percentile, write_results

log = logging.getLogger(__name__)

#: Busy share of all cores above which a run is reported as limited by this CPU.
CPU_LIMIT_SHARE = 0.9
#: Windows of this many seconds in which the busy share is sampled during a boot, and
#: the share of them at more than CPU_LIMIT_SHARE above which a run is CPU-limited.
CPU_SAMPLE_SECONDS = 0.5
CPU_SATURATED_SHARE = 0.2


@dataclass
class Plan:
    modes: list[str]
    hosts: list[int]
    vms_per_host: int
    speed: float
    trace: str | None
    image_size: int | None
    working_set: int | None
    chunk_size: int
    attach_delays: list[float]
    copy_max_hosts: int
    rate: str
    delay: str
    #: Time dilation: think times and attach delays x D, link rates / D (plan_from_args).
    dilation: float = 1.0
    #: virtman runs: give Volt a boot profile made from the trace before the VMs start
    #: (as if recorded by earlier boots), so every host prefetches it.
    prefetch: bool = False
    prefix: str = ""
    max_hosts: int = 0
    workdir: str = ""
    delay_applied: bool = False
    runs: list[dict[str, Any]] = field(default_factory=list)


def load_plan_trace(plan: Plan) -> Trace:
    trace = load_trace(plan.trace)
    if plan.working_set:
        factor = plan.working_set / max(1, trace.working_set(plan.chunk_size))
        trace = trace.scaled(size_factor=factor)
    return trace


#: Error messages a run keeps in its document (the first ones; the count is io_errors).
ERROR_MESSAGES_KEPT = 10


# --- the parent: testbed lifecycle ------------------------------------------------------------


def run_scale(plan: Plan, json_path: str, command: str, keep_workdir: bool = False) -> int:
    bad = [m for m in plan.modes if m not in MODES]
    if bad:
        raise ConfigError(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    check_namespaces_work()
    plan.max_hosts = max(plan.hosts)
    netbed = Netbed(plan.max_hosts, LinkShape(plan.rate, plan.delay))
    plan.prefix = netbed.prefix
    workdir = tempfile.mkdtemp(prefix="virtman-scale-")
    plan.workdir = workdir
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in previous:
        signal.signal(s, interrupted)
    try:
        netbed.create()
        plan.delay_applied = netbed.delay_applied
        plan_path = os.path.join(workdir, "plan.json")
        with open(plan_path, "w", encoding="utf-8") as f:
            json.dump(asdict(plan), f)
        worker = [
            *netbed.command_prefix("origin"),
            sys.executable,
            "-m",
            "virtman_bench.scale",
            "--worker",
            plan_path,
        ]
        proc = subprocess.run(worker, check=False)
        with open(plan_path, encoding="utf-8") as f:
            done = json.load(f)  # the worker saves it after every run: keep what finished
    finally:
        netbed.destroy()
        left = netbed.leftovers()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if keep_workdir:
            print(f"the runs' files and logs are kept in {workdir}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", workdir], check=False)
        if left:
            print(f"warning: namespaces left behind: {left}", file=sys.stderr)
    runs = [
        Run(**{k: r[k] for k in Run.__dataclass_fields__ if k != "extra"}, extra=r.get("extra", {}))
        for r in done["runs"]
    ]
    settings = {k: v for k, v in done.items() if k not in ("runs", "prefix", "workdir")}
    settings["delay_applied"] = done["delay_applied"]
    write_results(json_path, "testbed", command, settings, runs)
    print(f"wrote {json_path} ({len(runs)} runs)")
    if proc.returncode != 0:
        raise ConfigError(
            f"benchmark worker failed with status {proc.returncode}; "
            f"the {len(runs)} runs that finished are in {json_path}"
        )
    return 0


# --- the worker: inside the origin's namespace ------------------------------------------------


class _NetbedPlacement(Netbed):
    """The parent's testbed, as seen from the worker: addresses only, nothing to create."""


async def _sample_cpu(peaks: list[float]) -> None:
    """Busy share of all cores in every CPU_SAMPLE_SECONDS window, into ``peaks``."""
    busy, total = _cpu_busy()
    while True:
        await asyncio.sleep(CPU_SAMPLE_SECONDS)
        b, t = _cpu_busy()
        peaks.append((b - busy) / max(1.0, t - total))
        busy, total = b, t


def _cpu_busy() -> tuple[float, float]:
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


async def _one_run(
    plan: Plan,
    trace: Trace,
    trace_path: str,
    image: str,
    mode: str,
    hosts: int,
    attach_delay: float,
    alone: float,
    index: int,
) -> Run:
    placement = _NetbedPlacement(plan.max_hosts, prefix=plan.prefix)
    settings = ClusterSettings(
        hosts=hosts,
        parents=1 if mode == "paper" else 2,
        chunk_size=plan.chunk_size,
        # The default heartbeat cadence (no failures are injected), dilated like every
        # other emulated duration: on links D times slower a heartbeat caught behind a
        # boot's transfers is late D times longer. Undilated, a 32-host prefetch run at
        # D = 12.8 lost a third of its agents to late heartbeats at the start of the boot
        # and rebuilt its tree under the booting VMs.
        heartbeat_interval=HEARTBEAT_INTERVAL_SECONDS * plan.dilation,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS * plan.dilation,
        mode=mode,
        attach_delay=attach_delay,
        log_level="warning",
    )
    cluster = LocalCluster(os.path.join(plan.workdir, f"run{index}"), settings, placement)
    fleets: list[FleetProcess] = []
    try:
        await cluster.start_origin(image)
        await cluster.start_volt()
        await cluster.start_agents()
        await cluster.register_image("img")
        if plan.prefetch and mode == "virtman":
            rows = ((r.t, r.op, r.offset, r.length) for r in trace.requests)
            profile = profile_from_trace(rows, plan.chunk_size, os.path.getsize(image))
            await cluster.set_profile("img", profile.to_doc())
        # Each host's VMs replay in a process in that host's namespace, started before
        # t0 (a process takes a moment to load): one process for all of them would make
        # its own core the bottleneck of a large run.
        fleets += [
            FleetProcess(
                placement.command_prefix(h),
                FleetSpec(
                    cluster.agents[h].url,
                    "img",
                    [f"{h}-vm{j + 1}" for j in range(plan.vms_per_host)],
                    trace_path,
                    plan.speed,
                    cluster.token_file("operator"),
                    cluster.ca_file,
                ),
                os.path.join(plan.workdir, f"run{index}", f"fleet-{h}.json"),
            )
            for h in cluster.host_names()
        ]
        await asyncio.gather(*(f.start() for f in fleets))
        origin_before = cluster.origin_bytes_sent
        services = ["origin", *cluster.host_names()]
        retransmits0 = await asyncio.to_thread(placement.tcp_retransmits, services)
        before = await _statuses(cluster)
        busy0, total0 = _cpu_busy()
        peaks: list[float] = []
        sampler = asyncio.ensure_future(_sample_cpu(peaks))
        t0 = time.monotonic()
        for f in fleets:
            f.go(t0)
        reports = await asyncio.gather(*(f.report() for f in fleets))
        busy1, total1 = _cpu_busy()
        sampler.cancel()
        retransmits1 = await asyncio.to_thread(placement.tcp_retransmits, services)
        retransmits = (None if retransmits0 is None or retransmits1 is None
                       else retransmits1 - retransmits0)
        after = await _statuses(cluster)
        sent = [int(a["relay_bytes_sent"]) for a in after.values()]
        levels = {
            h: int(a["images"]["img"]["level"])
            for h, a in after.items()
            if a["images"].get("img", {}).get("level") is not None
        }
        agents_cpu = sum(a["cpu_seconds"] - before[h]["cpu_seconds"] for h, a in after.items())
        prefetched = sum(
            int(a["images"].get("img", {}).get("cache_stats", {}).get("prefetched_bytes", 0))
            for a in after.values()
        )
        origin_bytes = cluster.origin_bytes_sent - origin_before
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))
        await cluster.stop()
    hosts_vms = zip(cluster.host_names(), reports, strict=True)
    vms = [(h, vm) for h, report in hosts_vms for vm in report["vms"]]
    fleets_cpu = sum(report["cpu_seconds"] for report in reports)
    boots = [vm["seconds"] for _, vm in vms]
    # The slowest boot per tree level: a step per level is latency added by each relay hop.
    by_level: dict[int, float] = {}
    for h, vm in vms:
        if h in levels:
            by_level[levels[h]] = round(max(by_level.get(levels[h], 0.0), vm["seconds"]), 3)
    errors = sum(vm["errors"] for _, vm in vms)
    share = (busy1 - busy0) / max(1.0, total1 - total0)
    # Boots are bursty: the average hides seconds when every core is busy.
    saturated = len([p for p in peaks if p > CPU_LIMIT_SHARE]) / max(1, len(peaks))
    run = Run(
        mode,
        hosts,
        plan.vms_per_host,
        round(max(boots), 3),
        round(sum(boots) / len(boots), 3),
        round(percentile(boots, 99), 3),
        round(alone, 3),
        origin_bytes,
        max(sent, default=0),
        extra={
            "attach_delay": attach_delay if mode == "paper" else None,
            "error_vms": sum(1 for _, vm in vms if vm["errors"]),
            # What went wrong, for the record: the first messages of the first VMs that
            # saw errors (a VM that could not be created counts every request).
            "error_messages": [
                f"{h}/{vm['name']}: {message}"
                for h, vm in vms if vm["errors"] for message in vm.get("messages", [])[:2]
            ][:ERROR_MESSAGES_KEPT],
            "io_errors": errors,
            "working_set_bytes": trace.working_set(plan.chunk_size),
            "cpu_busy_share": round(share, 3),
            "cpu_saturated_share": round(saturated, 3),
            "cpu_peak_share": round(max(peaks, default=share), 3),
            "cpu_limited": share > CPU_LIMIT_SHARE or saturated > CPU_SATURATED_SHARE,
            # Where the CPU went: the agents (virtman) and the stand-in VMs (the testbed).
            "agents_cpu_seconds": round(agents_cpu, 2),
            "vms_cpu_seconds": round(fleets_cpu, 2),
            "all_booted_by_level": {str(k): v for k, v in sorted(by_level.items())},
            "tcp_retransmits": retransmits,
            "prefetch": plan.prefetch and mode == "virtman",
            "prefetched_bytes": prefetched,
            "trace": trace.name,
            "speed": plan.speed,
            "rate": plan.rate,
        },
    )
    print(
        f"{mode:<8}{'' if mode != 'paper' else f'(attach {attach_delay:g}s)':<15} "
        f"{hosts:>4} hosts x {plan.vms_per_host}: all booted {run.all_booted_seconds:7.2f} s, "
        f"mean {run.mean_boot_seconds:6.2f}, p99 {run.p99_boot_seconds:6.2f} "
        f"(alone {alone:.2f}); origin {format_size(origin_bytes):>10}; "
        f"cpu {share:.0%} (over {CPU_LIMIT_SHARE:.0%} {saturated:.0%} of the time); "
        f"cpu-s agents {agents_cpu:.1f} VMs {fleets_cpu:.1f}; errors {errors}; "
        f"retransmits {retransmits}; by level {by_level}",
        flush=True,
    )
    return run


async def _statuses(cluster: LocalCluster) -> dict[str, Any]:
    """Every agent's status; an agent that does not answer fails the run."""
    names = cluster.host_names()
    found = await asyncio.gather(*(cluster.agent_status(h) for h in names))
    missing = [h for h, s in zip(names, found, strict=True) if s is None]
    if missing:
        raise NetworkError(f"agents {missing} did not answer /status during the run")
    return dict(zip(names, found, strict=True))


async def _worker(plan_path: str) -> int:
    with open(plan_path, encoding="utf-8") as f:
        plan = Plan(**json.load(f))
    trace = load_plan_trace(plan)
    image = os.path.join(plan.workdir, "image.raw")
    size = generate_image(image, trace, plan.chunk_size)
    if plan.image_size and plan.image_size > size:
        with open(image, "r+b") as f:
            f.truncate(plan.image_size)
    alone = await single_vm_seconds(image, trace, plan.speed, plan.workdir)
    trace_path = os.path.join(plan.workdir, "trace.csv")
    with open(trace_path, "w", encoding="utf-8") as f:
        f.write(format_trace(list(trace.requests), trace.name))
    print(
        f"trace {trace.name}: working set {format_size(trace.working_set(plan.chunk_size))}, "
        f"one VM alone from a local copy {alone:.2f} s",
        flush=True,
    )
    index = 0
    for hosts in plan.hosts:
        for mode in plan.modes:
            if mode == "copy" and hosts > plan.copy_max_hosts:
                print(
                    f"copy with {hosts} hosts skipped (--copy-max-hosts {plan.copy_max_hosts}):"
                    " it grows as hosts x image / origin link",
                    flush=True,
                )
                continue
            for delay in plan.attach_delays if mode == "paper" else [0.0]:
                index += 1
                run = await _one_run(
                    plan, trace, trace_path, image, mode, hosts, delay, alone, index
                )
                plan.runs.append({**{k: getattr(run, k) for k in run.__dataclass_fields__}})
                with open(plan_path, "w", encoding="utf-8") as f:
                    json.dump(asdict(plan), f)
    return 0


# --- command line ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated (default all)")
    p.add_argument("--hosts", type=_ints, default=[2, 4, 8, 16, 32], help="e.g. 2,4,8,16,32")
    p.add_argument("--vms-per-host", type=int, default=10)
    p.add_argument("--trace", metavar="FILE", help="boot trace (default: bundled Debian 12)")
    p.add_argument("--speed", type=float, default=1.0, help="divide think times by this")
    p.add_argument(
        "--working-set",
        type=parse_size,
        metavar="SIZE",
        help="scale the trace's reads to this working set (e.g. 300M)",
    )
    p.add_argument(
        "--image-size",
        type=parse_size,
        metavar="SIZE",
        help="serve an image this large (sparse; e.g. 15G)",
    )
    p.add_argument("--chunk-size", type=parse_size, default=256 * 1024, metavar="SIZE")
    p.add_argument(
        "--attach-delays",
        type=_floats,
        default=[10.0, 0.0],
        metavar="S[,S]",
        help="paper mode: seconds per level to attach; one run each (default 10,0)",
    )
    p.add_argument(
        "--copy-max-hosts",
        type=int,
        default=8,
        metavar="N",
        help="run copy mode up to N hosts only (it takes hosts x image / link)",
    )
    p.add_argument("--rate", default="1gbit", help="link rate per host, tc syntax (1gbit)")
    p.add_argument("--delay", default="0.2ms", help="one-way delay per link (needs netem)")
    p.add_argument(
        "--dilation",
        type=float,
        default=1.0,
        metavar="D",
        help="run D times slower: think times and attach delays x D, link rates / D, so "
        "this machine's CPU counts as D times faster (default 1)",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="virtman runs start with a boot profile of the trace (as if recorded by "
        "earlier boots), which every host prefetches",
    )
    p.add_argument("--json", default="bench-scale.json", metavar="FILE")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the runs' files and logs (Volt's, each agent's) for a post-mortem")


def plan_from_args(args: argparse.Namespace) -> Plan:
    dilation = args.dilation
    if not dilation > 0:
        raise ConfigError(f"--dilation {dilation}: must be above zero")
    rate = args.rate
    if dilation != 1:
        # tc takes whole kbit; parse_link_rate gives bytes per second.
        rate = f"{max(1, round(parse_link_rate(args.rate) * 8 / dilation / 1000))}kbit"
    return Plan(
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        hosts=sorted(set(args.hosts)),
        vms_per_host=args.vms_per_host,
        speed=args.speed / dilation,
        trace=args.trace,
        image_size=args.image_size,
        working_set=args.working_set,
        chunk_size=args.chunk_size,
        attach_delays=[d * dilation for d in args.attach_delays],
        copy_max_hosts=args.copy_max_hosts,
        rate=rate,
        delay=args.delay,
        dilation=dilation,
        prefetch=args.prefetch,
    )


def run(args: argparse.Namespace) -> int:
    from virtman.runtime import configure_logging

    configure_logging("warning" if args.log_level == "info" else args.log_level)
    plan = plan_from_args(args)
    command = "virtman bench scale " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    return run_scale(plan, args.json, command, keep_workdir=args.keep_workdir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from virtman.runtime import configure_logging, run_async

        configure_logging("warning")
        sys.exit(run_async(_worker(sys.argv[2])))
    print("usage: virtman bench scale ... (this module's --worker is internal)", file=sys.stderr)
    sys.exit(2)
