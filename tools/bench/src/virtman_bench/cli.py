"""``virtman bench``: benchmarks that print figures (see ``bench/`` and docs/benchmarks.md).

The ``virtman`` command finds this module through the entry point ``bench`` of the group
``virtman.commands`` (tools/bench/pyproject.toml) and calls the two functions below.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a benchmark")
    kinds = p.add_subparsers(dest="bench", required=True, parser_class=type(p))
    nbd = kinds.add_parser(
        "nbd", help="NBD server throughput against qemu-nbd and nbdkit", add_help=False
    )
    nbd.add_argument("rest", nargs="*", help="options of the benchmark (see --help)")
    nbd.set_defaults(run=_run_nbd)

    from virtman_bench import calibrate, guests, report, scale, store, uvm
    from virtman_bench.sim import cli as simulate

    for name, module, text in (
        ("scale", scale, "boot time vs hosts per mode, on emulated hosts (root)"),
        ("simulate", simulate, "discrete-event simulation, 100 to 10,000 hosts"),
        ("calibrate", calibrate, "the simulator against a testbed result"),
        ("guests", guests, "real QEMU guests: local raw file vs virtman"),
        ("report", report, "plots and a Markdown page from benchmark results"),
        ("uvm", uvm, "prebaked µVMs and live migration: issue 12's targets"),
        ("store", store, "bytes on disk of the deduplicated host store"),
    ):
        sp = kinds.add_parser(name, help=text, description=module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)

def run_unparsed(argv: list[str]) -> int | None:
    """``bench nbd`` parses its own options: it gets everything after its name."""
    if argv[:1] == ["nbd"]:
        from virtman_bench.nbd import main

        return main(argv[1:])
    return None


def _run_nbd(args: argparse.Namespace) -> int:
    from virtman_bench.nbd import main

    return main(list(args.rest))


if TYPE_CHECKING:
    # mypy checks that this module is what ``virtman`` expects of its entry point.
    from virtman.cli.main import Command
    from virtman_bench import cli as _this

    _AS_COMMAND: Command = _this
