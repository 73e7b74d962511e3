"""``virtman bench``: benchmarks that print figures (see ``bench/`` and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a benchmark")
    kinds = p.add_subparsers(dest="bench", required=True, parser_class=type(p))
    nbd = kinds.add_parser(
        "nbd", help="NBD server throughput against qemu-nbd and nbdkit", add_help=False
    )
    nbd.add_argument("rest", nargs="*", help="options of the benchmark (see --help)")
    nbd.set_defaults(run=_run_nbd)

    from virtman.bench import scale

    sc = kinds.add_parser("scale", help="boot time vs hosts per mode, on emulated hosts (root)",
                          description=scale.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    scale.add_arguments(sc)
    sc.set_defaults(run=scale.run)

    from virtman.sim import cli as sim_cli

    sm = kinds.add_parser("simulate", help="discrete-event simulation, 100 to 10,000 hosts",
                          description=sim_cli.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sim_cli.add_arguments(sm)
    sm.set_defaults(run=sim_cli.run)

    from virtman.bench import calibrate

    cb = kinds.add_parser("calibrate", help="the simulator against a testbed result",
                          description=calibrate.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate.add_arguments(cb)
    cb.set_defaults(run=calibrate.run)

    from virtman.bench import guests

    gb = kinds.add_parser("guests", help="real QEMU guests: local raw file vs virtman",
                          description=guests.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    guests.add_arguments(gb)
    gb.set_defaults(run=guests.run)

    from virtman.bench import report

    rp = kinds.add_parser("report", help="plots and a Markdown page from benchmark results",
                          description=report.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(rp)
    rp.set_defaults(run=report.run)


def _run_nbd(args: argparse.Namespace) -> int:
    from virtman.bench.nbd import main

    return main(list(args.rest))
