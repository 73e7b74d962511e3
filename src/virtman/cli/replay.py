"""``virtman replay``: one stand-in VM replaying a boot trace through an NBD URI.

    virtman replay URI [--trace FILE] [--speed X]

Prints the boot time and the I/O errors seen; exits 1 if there were any.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a boot trace through an NBD URI",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("--trace", metavar="FILE", help="boot trace (default: bundled Debian 12)")
    p.add_argument("--speed", type=float, default=1.0, help="divide think times by this")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.protocol.uri import parse_nbd_uri
    from virtman.replay import load_trace, replay
    from virtman.runtime import run_async

    parse_nbd_uri(args.uri)
    trace = load_trace(args.trace)

    async def main() -> int:
        r = await replay(args.uri, trace, speed=args.speed)
        print(
            f"booted in {r.boot_seconds:.2f} s: {r.requests} requests, "
            f"{r.bytes_read} bytes read, {r.bytes_written} written, {r.errors} errors"
        )
        for m in r.messages:
            print(f"  {m}")
        return 1 if r.errors else 0

    return run_async(main())
