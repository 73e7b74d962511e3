"""``virtman bench simulate``: run the discrete-event model over modes and host counts.

Prints one table row per (mode, host count) as it finishes, and with ``--json FILE``
writes the runs in the format of ``virtman_bench.results`` (kind ``simulation``). The
model and its simplifications are described in ``virtman_bench.sim.model``.

The ``uvm`` mode (VMs resumed from one bake) prints in the same table: its "all booted"
is the time every VM is running. Under each uvm row a goal line says whether every VM
runs before ``--goal-seconds``; with ``--uvm-budget`` it also gives the largest resume
time and bake that still meet the goal (``model.uvm_budget``, more simulations).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from virtman.errors import ConfigError, VirtmanError
from virtman.sizes import format_rate, format_size, parse_link_rate, parse_size
from virtman_bench.results import Run, write_results
from virtman_bench.sim.model import (
    DEFAULT_ATTACH_DELAY,
    DEFAULT_CORES,
    DEFAULT_PREFETCH_MISS,
    DEFAULT_RTT,
    DEFAULT_UVM_GOAL_SECONDS,
    DEFAULT_UVM_RESUME_SECONDS,
    MODES,
    NETWORKS,
    PREFETCH_DEMAND,
    PREFETCH_FROM,
    PREFETCH_MISS,
    RELAYS,
    UVM_MODE,
    BootPattern,
    SimConfig,
    SimResult,
    pattern_from_trace,
    simulate,
    synthetic_pattern,
    uvm_budget,
)

DEFAULT_MODES = "paper,virtman"
DEFAULT_HOSTS = "100,1000,10000"
DEFAULT_VMS_PER_HOST = 10
DEFAULT_IMAGE_SIZE = "15G"
DEFAULT_WORKING_SET = "300M"
DEFAULT_LINK = "1gbit"
DEFAULT_BOOT_SECONDS = 10.0
DEFAULT_CHUNK_SIZE = "256K"
#: The model's defaults (the agent's limits), as the command line spells them.
DEFAULT_PREFETCH_BATCH = "4M"
DEFAULT_PREFETCH_INFLIGHT = "16M"
#: uvm mode's bake sizes as the command line spells them (model.DEFAULT_UVM_*_BYTES).
DEFAULT_STATE_SIZE = "64M"
DEFAULT_LAYER_SIZE = "8M"

def _list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{what}: expected a comma-separated list")
    return items


def _host_counts(text: str) -> list[int]:
    counts = []
    for item in _list(text, "--hosts"):
        try:
            counts.append(int(item))
        except ValueError:
            raise ConfigError(f"--hosts: {item!r} is not a whole number") from None
        if counts[-1] < 1:
            raise ConfigError(f"--hosts: {item} is not at least 1")
    return counts


def _modes(text: str) -> list[str]:
    modes = _list(text, "--modes")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    return modes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated, of {', '.join(MODES)} (default {DEFAULT_MODES})")
    p.add_argument("--hosts", default=DEFAULT_HOSTS,
                   help=f"comma-separated host counts (default {DEFAULT_HOSTS})")
    p.add_argument("--vms-per-host", type=int, default=DEFAULT_VMS_PER_HOST, metavar="M",
                   help=f"VMs booting on every host (default {DEFAULT_VMS_PER_HOST})")
    p.add_argument("--image-size", default=DEFAULT_IMAGE_SIZE, metavar="SIZE",
                   help=f"image size, e.g. 15G (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--working-set", default=DEFAULT_WORKING_SET, metavar="SIZE",
                   help=f"distinct data one boot reads (default {DEFAULT_WORKING_SET})")
    p.add_argument("--link", default=DEFAULT_LINK, metavar="RATE",
                   help="every link's rate each way, in bits per second: 1gbit, 100mbit,"
                        f" 10gbit (default {DEFAULT_LINK})")
    p.add_argument("--boot-seconds", type=float, default=DEFAULT_BOOT_SECONDS, metavar="T",
                   help="one VM's boot from a local disk: the pattern's think time"
                        f" (default {DEFAULT_BOOT_SECONDS:g})")
    p.add_argument("--chunk-size", default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help=f"cache chunk and transfer size (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--rtt", type=float, default=DEFAULT_RTT, metavar="SECONDS",
                   help=f"round trip added to every request (default {DEFAULT_RTT:g})")
    p.add_argument("--attach-delay", type=float, default=DEFAULT_ATTACH_DELAY,
                   metavar="SECONDS",
                   help="paper mode: attach time per tree level"
                        f" (default {DEFAULT_ATTACH_DELAY:g})")
    p.add_argument("--fanout", type=int, default=2, help="children per node (default 2)")
    p.add_argument("--parents", type=int, default=2,
                   help="virtman mode: parents per node (default 2; paper mode uses 1)")
    p.add_argument("--trace", default=None, metavar="FILE|none",
                   help="boot trace to derive the read pattern from (default: the bundled"
                        " Debian 12 trace, scaled); 'none' for the synthetic pattern")
    p.add_argument("--network", default="switch", choices=NETWORKS,
                   help="link model: switch (each end queues on its own, as through a "
                        "switch) or coupled (a transfer holds both ends' links at once) "
                        "(default switch)")
    p.add_argument("--prefetch", action="store_true",
                   help="virtman mode: every host prefetches the boot profile (the chunks"
                        " the pattern reads, in the order of their first read) from its"
                        " parents from t = 0, demand reads first")
    p.add_argument("--prefetch-batch", default=DEFAULT_PREFETCH_BATCH, metavar="SIZE",
                   help="most bytes one prefetch request asks for, adjacent chunks"
                        f" (default {DEFAULT_PREFETCH_BATCH})")
    p.add_argument("--prefetch-inflight", default=DEFAULT_PREFETCH_INFLIGHT, metavar="SIZE",
                   help="most prefetch bytes a host has asked for and not received"
                        f" (default {DEFAULT_PREFETCH_INFLIGHT})")
    p.add_argument("--prefetch-rate", default=None, metavar="RATE",
                   help="cap on each host's prefetch, in bits per second like --link"
                        " (default: none)")
    p.add_argument("--prefetch-from", default=PREFETCH_FROM[0], choices=PREFETCH_FROM,
                   help="where prefetch requests go: the parents in turn (as demand reads)"
                        f" or the first parent only (default {PREFETCH_FROM[0]})")
    p.add_argument("--prefetch-miss", default=DEFAULT_PREFETCH_MISS, choices=PREFETCH_MISS,
                   help="how a parent fetches a chunk a child's prefetch asks for and it"
                        " lacks: as a demand read or as prefetch (as the agent's prefetch export)"
                        f" (default {DEFAULT_PREFETCH_MISS}, what the agent does)")
    p.add_argument("--prefetch-demand", default=PREFETCH_DEMAND[0], choices=PREFETCH_DEMAND,
                   help="a VM's miss on a chunk prefetch asked for: sent as demand at once"
                        " (promote) or waits for the prefetch request (join)"
                        f" (default {PREFETCH_DEMAND[0]})")
    p.add_argument("--relay", default=RELAYS[0], choices=RELAYS,
                   help="when a parent relays a chunk: once held whole (store-and-forward,"
                        " as the agent does) or as its bytes arrive (cut-through)"
                        f" (default {RELAYS[0]})")
    p.add_argument("--state-size", default=DEFAULT_STATE_SIZE, metavar="SIZE",
                   help="uvm mode: the bake's saved device and memory state, as it streams"
                        f" (default {DEFAULT_STATE_SIZE})")
    p.add_argument("--layer-size", default=DEFAULT_LAYER_SIZE, metavar="SIZE",
                   help="uvm mode: the bake's disk layer (what the guest wrote before it"
                        f" was baked) (default {DEFAULT_LAYER_SIZE})")
    p.add_argument("--resume-seconds", type=float, default=DEFAULT_UVM_RESUME_SECONDS,
                   metavar="R",
                   help="uvm mode: one VM's resume from a locally held state, CPU-bound"
                        f" (default {DEFAULT_UVM_RESUME_SECONDS:g})")
    p.add_argument("--cores", type=float, default=DEFAULT_CORES,
                   help="uvm mode: cores per host, shared by its resuming VMs"
                        f" (default {DEFAULT_CORES:g})")
    p.add_argument("--base-reads", default="0", metavar="SIZE",
                   help="uvm mode: base-image bytes each VM reads right after it resumed"
                        " (the boot profile's first chunks; prefetched with --prefetch)"
                        " (default 0)")
    p.add_argument("--goal-seconds", type=float, default=DEFAULT_UVM_GOAL_SECONDS,
                   metavar="SECONDS",
                   help="uvm mode: the goal every VM must be running by"
                        f" (default {DEFAULT_UVM_GOAL_SECONDS:g})")
    p.add_argument("--uvm-budget", action="store_true",
                   help="uvm mode: also find the largest resume time and bake that meet"
                        " the goal (about ten more simulations per uvm row)")
    p.add_argument("--json", metavar="FILE", help="write the results document here")


def _pattern(args: argparse.Namespace, chunk: int, image: int, working_set: int) -> BootPattern:
    if args.trace is not None and args.trace.lower() == "none":
        return synthetic_pattern(chunk, working_set, args.boot_seconds)
    from virtman.replay.trace import load_trace

    trace = load_trace(args.trace)
    return pattern_from_trace(trace, chunk, image, working_set, args.boot_seconds)


def _command(args: argparse.Namespace) -> str:
    words = [
        "virtman", "bench", "simulate",
        "--modes", args.modes, "--hosts", args.hosts,
        "--vms-per-host", str(args.vms_per_host),
        "--image-size", args.image_size, "--working-set", args.working_set,
        "--link", args.link, "--boot-seconds", f"{args.boot_seconds:g}",
        "--chunk-size", args.chunk_size, "--rtt", f"{args.rtt:g}",
        "--attach-delay", f"{args.attach_delay:g}",
        "--fanout", str(args.fanout), "--parents", str(args.parents),
        "--network", args.network,
    ]
    if args.trace is not None:
        words += ["--trace", args.trace]
    # uvm mode prefetches its bake with these settings, with or without --prefetch.
    if args.prefetch or UVM_MODE in _list(args.modes, "--modes"):
        words += ["--prefetch"] if args.prefetch else []
        words += ["--prefetch-batch", args.prefetch_batch,
                  "--prefetch-inflight", args.prefetch_inflight,
                  "--prefetch-from", args.prefetch_from, "--prefetch-miss", args.prefetch_miss,
                  "--prefetch-demand", args.prefetch_demand]
        if args.prefetch_rate is not None:
            words += ["--prefetch-rate", args.prefetch_rate]
    if args.relay != RELAYS[0]:
        words += ["--relay", args.relay]
    if UVM_MODE in _list(args.modes, "--modes"):
        words += ["--state-size", args.state_size, "--layer-size", args.layer_size,
                  "--resume-seconds", f"{args.resume_seconds:g}", "--cores", f"{args.cores:g}",
                  "--base-reads", args.base_reads, "--goal-seconds", f"{args.goal_seconds:g}"]
        if args.uvm_budget:
            words.append("--uvm-budget")
    if args.json:
        words += ["--json", args.json]
    return shlex.join(words)


HEADER = (
    f"{'mode':<8} {'hosts':>6} {'all booted':>11} {'mean':>9} {'p99':>9} {'floor':>9}"
    f" {'x floor':>7} {'origin bytes':>13} {'max host sent':>13} {'sim wall':>9}"
)


def format_row(run: Run) -> str:
    return (
        f"{run.mode:<8} {run.hosts:>6} {run.all_booted_seconds:>10.2f}s"
        f" {run.mean_boot_seconds:>8.2f}s {run.p99_boot_seconds:>8.2f}s"
        f" {run.extra['floor_seconds']:>8.2f}s"
        f" {run.all_booted_seconds / run.extra['floor_seconds']:>6.3f}x"
        f" {format_size(run.origin_bytes_sent):>13}"
        f" {format_size(run.max_host_bytes_sent):>13} {run.extra['sim_wall_seconds']:>8.2f}s"
    )


def goal_line(result: SimResult, goal_seconds: float) -> str:
    """Whether every VM of a uvm run is running before the goal, with the inputs."""
    cfg = result.config
    t = result.all_booted_seconds
    share = max(1.0, cfg.vms_per_host / cfg.cores)
    return (
        f"  uvm goal: {cfg.hosts * cfg.vms_per_host:,} VMs on {cfg.hosts:,} hosts all running"
        f" in {t:.2f} s: {'met' if t < goal_seconds else 'NOT met'} (< {goal_seconds:g} s;"
        f" one bake: state {format_size(cfg.state_bytes)} + layer"
        f" {format_size(cfg.layer_bytes)}, resume {cfg.resume_seconds:g} s x {share:g}"
        f" ({cfg.vms_per_host} VMs on {cfg.cores:g} cores), link {format_rate(cfg.link_rate)})"
    )


def budget_line(result: SimResult, goal_seconds: float) -> tuple[str, dict[str, Any]]:
    """The largest resume time and bake that meet the goal (simulated), and as keys."""
    cfg = result.config
    b = uvm_budget(cfg, goal_seconds, result)
    line = (
        f"  uvm budget for < {goal_seconds:g} s: resume <= {b.max_resume_seconds:.2f} s per VM"
        f" at this bake ({b.resume_check_seconds:.2f} s simulated there); bake (state +"
        f" layer) <= {format_size(b.max_bake_bytes)} at resume {cfg.resume_seconds:g} s"
        f" ({b.bake_check_seconds:.2f} s simulated there; {b.runs} simulations)"
    )
    keys = {
        "goal_seconds": goal_seconds,
        "budget_max_resume_seconds": b.max_resume_seconds,
        "budget_resume_check_seconds": b.resume_check_seconds,
        "budget_max_bake_bytes": b.max_bake_bytes,
        "budget_bake_check_seconds": b.bake_check_seconds,
    }
    return line, keys


def run(args: argparse.Namespace) -> int:
    modes = _modes(args.modes)
    host_counts = _host_counts(args.hosts)
    image = parse_size(args.image_size)
    working_set = parse_size(args.working_set)
    chunk = parse_size(args.chunk_size)
    rate = parse_link_rate(args.link)
    if chunk < 1:
        raise ConfigError("--chunk-size must be at least 1 byte")
    pattern = _pattern(args, chunk, image, working_set)
    batch = parse_size(args.prefetch_batch)
    inflight = parse_size(args.prefetch_inflight)
    prefetch_rate = 0.0 if args.prefetch_rate is None else parse_link_rate(args.prefetch_rate)
    state_size = parse_size(args.state_size)
    layer_size = parse_size(args.layer_size)
    base_reads = parse_size(args.base_reads)
    if not args.goal_seconds > 0:
        raise ConfigError(f"--goal-seconds must be positive, not {args.goal_seconds:g}")

    settings: dict[str, Any] = {
        "modes": modes,
        "hosts": host_counts,
        "vms_per_host": args.vms_per_host,
        "image_size": image,
        "working_set": working_set,
        "chunk_size": chunk,
        "link_bytes_per_second": rate,
        "rtt_seconds": args.rtt,
        "boot_seconds": args.boot_seconds,
        "attach_delay_seconds": args.attach_delay,
        "fanout": args.fanout,
        "parents_per_node": args.parents,
        "network": args.network,
        "relay": args.relay,
        "prefetch": args.prefetch,
        "pattern": {
            "source": pattern.source,
            "batches": len(pattern.batches),
            "reads": pattern.reads,
            "distinct_chunks": pattern.distinct_chunks,
            "think_seconds": pattern.think_seconds,
        },
    }
    print(
        f"pattern: {pattern.source}: {len(pattern.batches)} batches, {pattern.reads} chunk"
        f" reads of {pattern.distinct_chunks} chunks"
        f" ({format_size(pattern.distinct_chunks * chunk)}), {pattern.think_seconds:g} s think"
    )
    print(
        f"image {format_size(image)}, chunk {format_size(chunk)}, link {format_rate(rate)}"
        f" each way, rtt {args.rtt * 1000:g} ms, {args.vms_per_host} VMs per host,"
        f" fan-out {args.fanout}, parents {args.parents} (paper: 1),"
        f" attach {args.attach_delay:g} s per level (paper), network {args.network}"
    )
    if args.prefetch or UVM_MODE in modes:
        settings.update({
            "prefetch_batch_bytes": batch,
            "prefetch_inflight_bytes": inflight,
            "prefetch_bytes_per_second": prefetch_rate or None,
            "prefetch_from": args.prefetch_from,
            "prefetch_miss": args.prefetch_miss,
            "prefetch_demand": args.prefetch_demand,
        })
    if args.prefetch:
        cap = format_rate(prefetch_rate) if prefetch_rate else "no"
        print(
            f"prefetch (virtman mode): the profile of {pattern.distinct_chunks} chunks in"
            f" order of first read, requests of up to {format_size(batch)},"
            f" {format_size(inflight)} in flight, {cap} rate cap, from"
            f" {'the first parent' if args.prefetch_from == 'primary' else 'the parents in turn'},"
            f" a parent's miss fetched as {args.prefetch_miss}, a VM's miss on a prefetch"
            f" chunk: {args.prefetch_demand}"
        )
    if UVM_MODE in modes:
        settings.update({
            "state_bytes": state_size,
            "layer_bytes": layer_size,
            "resume_seconds": args.resume_seconds,
            "cores": args.cores,
            "base_read_bytes": base_reads,
            "goal_seconds": args.goal_seconds,
        })
        print(
            f"uvm: one bake, state {format_size(state_size)} + layer {format_size(layer_size)}"
            f" prefetched by every host (state first), each VM resumes in"
            f" {args.resume_seconds:g} s on a core of its own ({args.cores:g} cores per host),"
            f" then reads its layer and {format_size(base_reads)} of the base;"
            f" 'all booted' is all running. Bake prefetch: requests of up to"
            f" {format_size(batch)}, {format_size(inflight)} in flight, from"
            f" {'the first parent' if args.prefetch_from == 'primary' else 'the parents in turn'},"
            f" a parent's miss fetched as {args.prefetch_miss}, QEMU's read of a chunk"
            f" on its way: {args.prefetch_demand}"
        )
    print(f"relay: {args.relay}")
    print(HEADER, flush=True)
    runs: list[Run] = []
    for mode in modes:
        for hosts in host_counts:
            cfg = SimConfig(
                mode=mode,
                hosts=hosts,
                vms_per_host=args.vms_per_host,
                image_size=image,
                working_set=working_set,
                chunk_size=chunk,
                link_rate=rate,
                rtt=args.rtt,
                boot_seconds=args.boot_seconds,
                attach_delay=args.attach_delay,
                fanout=args.fanout,
                parents=args.parents,
                pattern=pattern,
                network=args.network,
                relay=args.relay,
                prefetch=args.prefetch and mode in ("virtman", UVM_MODE),
                prefetch_batch_bytes=batch,
                prefetch_inflight_bytes=inflight,
                prefetch_rate=prefetch_rate,
                prefetch_from=args.prefetch_from,
                prefetch_miss=args.prefetch_miss,
                prefetch_demand=args.prefetch_demand,
                state_bytes=state_size,
                layer_bytes=layer_size,
                resume_seconds=args.resume_seconds,
                cores=args.cores,
                base_read_bytes=base_reads if mode == UVM_MODE else 0,
            )
            sim = simulate(cfg)
            result = sim.to_run()
            runs.append(result)
            print(format_row(result), flush=True)
            if mode == UVM_MODE:
                print(goal_line(sim, args.goal_seconds), flush=True)
                result.extra["goal_met"] = sim.all_booted_seconds < args.goal_seconds
                if args.uvm_budget:
                    line, keys = budget_line(sim, args.goal_seconds)
                    result.extra.update(keys)
                    print(line, flush=True)
    if args.json:
        try:
            write_results(args.json, "simulation", _command(args), settings, runs)
        except OSError as err:
            raise VirtmanError(f"cannot write {args.json}: {err.strerror}") from err
        print(f"wrote {args.json}")
    return 0
