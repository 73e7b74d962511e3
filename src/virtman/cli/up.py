"""``virtman up``: a whole cluster on this machine, booting replayed VMs through the tree.

    virtman up [--hosts 8] [--vms-per-host 4] [--trace FILE] [--speed X] [--image FILE]
               [--kill HOST@SECONDS ...] [--json FILE] [--workdir DIR]
               [--accel auto|kvm|tcg] [--insecure] [--ui] [--ui-hold SECONDS]
               [--prefetch]

Starts an origin (a generated test image unless ``--image``), Volt and the agents on
loopback, boots every VM by replaying the boot trace (default: the bundled Debian 12
trace) with its think times divided by ``--speed``, prints the tree and a summary, and
stops everything it started (also on Ctrl-C). On a terminal each step draws a progress
bar and the summary is tables; piped, it prints plain lines. ``--accel`` is every
agent's, for QEMU guests started on them meanwhile (the replayed VMs run no QEMU).
``--ui`` prints the address of Volt's live view of the tree once Volt is up, and keeps
the cluster after the summary until Ctrl-C (``--ui-hold SECONDS``: that long at most).

Volt and the agents serve HTTPS and require credentials: the cluster makes a CA, a
certificate per service and the tokens in ``WORKDIR/credentials``
(``operator.token`` works with ``virtman vm``/``image --token-file`` and
``--tls-ca WORKDIR/credentials/ca.crt`` while it runs). ``--insecure`` runs them on
plain HTTP instead (tokens still required).

``--prefetch`` gives Volt a boot profile of the trace before the VMs start, as if
earlier boots had recorded it, so every host prefetches it from its parents while its
VMs boot (docs/data-plane.md, "Boot profiles and prefetch").
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from virtman.hypervisor.options import add_accel_option
from virtman.limits import (
    DEFAULT_CHUNK_SIZE,
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
)
from virtman.sizes import format_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "up",
        help="boot many VMs through the relay tree on this machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hosts", type=int, default=8, help="agents to start (default 8)")
    p.add_argument("--vms-per-host", type=int, default=4, help="VMs per agent (default 4)")
    p.add_argument("--trace", metavar="FILE", help="boot trace (default: bundled Debian 12)")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="divide the trace's think times by this (default 1)",
    )
    p.add_argument("--image", metavar="FILE", help="raw image to serve (default: generated)")
    p.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="HOST@SECONDS",
        help="SIGKILL that agent this long after the VMs start (repeatable)",
    )
    p.add_argument("--json", metavar="FILE", help="write the result document here")
    p.add_argument("--workdir", metavar="DIR", help="where the cluster keeps its files")
    p.add_argument("--fanout", type=int, default=TREE_FANOUT)
    p.add_argument("--parents", type=int, default=TREE_PARENTS_PER_NODE)
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE")
    p.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_SECONDS)
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_SECONDS)
    p.add_argument(
        "--ui",
        action="store_true",
        help="print the address of Volt's live view; keep it after the run until Ctrl-C",
    )
    p.add_argument(
        "--ui-hold",
        type=float,
        metavar="SECONDS",
        help="with --ui (implied): keep the view this long after the run, not until Ctrl-C",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="start with a boot profile of the trace, which every host prefetches",
    )
    add_accel_option(p)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP between the services instead of TLS (tokens still required)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.cli.console import RichDisplay, is_terminal, make_console
    from virtman.cluster.local import ClusterSettings
    from virtman.cluster.up import UpOptions, parse_kill, print_summary, run_up
    from virtman.errors import ConfigError
    from virtman.limits import PROGRESS_REFRESH_SECONDS
    from virtman.progress import PlainDisplay
    from virtman.replay.trace import load_trace
    from virtman.runtime import configure_logging, run_async

    if args.hosts < 1 or args.vms_per_host < 1:
        raise ConfigError("--hosts and --vms-per-host must be at least 1")
    if args.speed <= 0:
        raise ConfigError("--speed must be positive")
    if args.ui_hold is not None and args.ui_hold < 0:
        raise ConfigError(f"--ui-hold {args.ui_hold:g}: expected seconds, 0 or more")
    options = UpOptions(
        trace=load_trace(args.trace),
        vms_per_host=args.vms_per_host,
        speed=args.speed,
        image=args.image,
        kills=[parse_kill(k) for k in args.kill],
        workdir=args.workdir,
        ui=args.ui or args.ui_hold is not None,
        ui_hold=args.ui_hold,
        prefetch=args.prefetch,
        cluster=ClusterSettings(
            hosts=args.hosts,
            fanout=args.fanout,
            parents=args.parents,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            chunk_size=args.chunk_size,
            log_level="warning" if args.log_level == "info" else args.log_level,
            accel=args.accel,
            insecure=args.insecure,
        ),
    )
    configure_logging("warning" if args.log_level == "info" else args.log_level)

    console = make_console() if is_terminal() else None
    display = PlainDisplay() if console is None else RichDisplay(console, PROGRESS_REFRESH_SECONDS)

    async def main() -> int:
        # The summary is shown by run_up itself: with --ui, before it holds the cluster.
        doc = await run_up(
            options,
            display,
            print_summary if console is None else lambda d: print_tables(console, d),
        )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
            print(f"wrote {args.json}")
        return 0 if doc["errors_on_surviving_hosts"] == 0 else 1

    return run_async(main())


def print_tables(console: Console, doc: dict[str, Any]) -> None:
    """The summary of ``virtman up`` as tables: the tree with each host's bytes, then
    the boot times."""
    from virtman.cli.console import print_table
    from virtman.planner.tree import ORIGIN

    tree = doc["tree"]
    rows = []
    for h in sorted(doc["hosts"], key=lambda h: (h["level"] or 1 << 30, h["position"] or 0)):
        received = h["bytes_received"]
        rows.append([
            str(h["level"] or "-"),
            h["name"],
            ", ".join(h["parents"]),
            format_size(sum(v for k, v in received.items() if k != ORIGIN)),
            format_size(received.get(ORIGIN, 0)),
            "yes" if h["killed"] else "",
        ])
    console.print()
    print_table(
        console,
        f"relay tree: depth {tree['depth']}, fan-out {tree['fanout']}, "
        f"{tree['parents_per_node']} parents per host",
        ["level", "host", "parents", "from parents", "from origin", "killed"],
        rows,
        right=["level", "from parents", "from origin"],
    )
    survivors = sum(1 for v in doc["vms"] if not v["killed_host"])
    sent, ws = doc["origin_bytes_sent"], doc["working_set_bytes"]
    print_table(
        console,
        f"boot times of {survivors} VMs on surviving hosts",
        ["", "seconds"],
        [
            ["all booted", str(doc["all_booted_seconds"])],
            ["mean", str(doc["mean_boot_seconds"])],
            ["p99", str(doc["p99_boot_seconds"])],
            ["one VM alone from a local copy", str(doc["single_vm_seconds"])],
        ],
        right=["seconds"],
    )
    console.print(
        f"I/O errors seen by VMs on surviving hosts: {doc['errors_on_surviving_hosts']}\n"
        f"origin sent {format_size(sent)}: {sent / ws:.2f} x the working set of "
        f"{format_size(ws)} ({tree['roots']} tree roots)",
        markup=False,
    )
