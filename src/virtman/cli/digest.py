"""``virtman digest``: the digest manifest of an image, for relays to verify chunks.

    virtman digest SOURCE [--chunk-size SIZE] [-o MANIFEST]

SOURCE is a raw file or an NBD URI. The manifest (JSON, one SHA-256 per chunk) goes to
MANIFEST or standard output; give it to ``virtman serve --upstream ... --manifest``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from virtman.errors import ConfigError
from virtman.limits import DEFAULT_CHUNK_SIZE
from virtman.sizes import parse_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "digest",
        help="compute the digest manifest of an image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="raw image file or NBD URI")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="chunk size; must match the relays' (default 256K)",
    )
    p.add_argument("-o", "--output", metavar="MANIFEST", help="write here instead of stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.blockdev.base import BlockDevice
    from virtman.blockdev.file import FileDevice
    from virtman.blockdev.manifest import compute_manifest
    from virtman.blockdev.remote import RemoteDevice
    from virtman.runtime import run_async

    device: BlockDevice
    if "://" in args.source:
        device = RemoteDevice([args.source])
    elif os.path.isfile(args.source):
        device = FileDevice(args.source, read_only=True)
    else:
        raise ConfigError(f"SOURCE {args.source!r} is neither a file nor an NBD URI")

    async def compute() -> int:
        await device.open()
        try:
            manifest = await compute_manifest(device, args.chunk_size)
        finally:
            await device.close()
        text = manifest.to_json()
        if args.output:
            tmp = f"{args.output}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, args.output)
        else:
            sys.stdout.write(text + "\n")
        return 0

    return run_async(compute())
