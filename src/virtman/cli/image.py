"""``virtman image``: the image registry of Volt.

    virtman image add NAME --origin URI [--origin URI ...] [--chunk-size 256K] [--volt URL]
    virtman image list | show NAME | tree NAME | rm NAME   [--volt URL]

``add`` makes Volt read the image once from its origin and store its digest manifest;
an origin that cannot be reached is refused with the reason.

``add`` and ``rm`` need an operator token, the others any token (``--token-file FILE``,
``--token`` or ``$VIRTMAN_TOKEN``); Volt is verified against ``--tls-ca``.
"""

from __future__ import annotations

import argparse
from typing import Any

from virtman.cli.common import (
    add_client_options,
    add_volt_option,
    client_credentials,
    print_json,
)
from virtman.limits import DEFAULT_CHUNK_SIZE, IMAGE_REGISTER_TIMEOUT_SECONDS
from virtman.sizes import parse_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "image",
        help="register and inspect images (Volt)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    add = actions.add_parser("add", help="register an image")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--origin",
        action="append",
        required=True,
        metavar="URI",
        help="NBD URI of the image's origin (repeatable)",
    )
    add.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE")
    for name in ("list", "show", "tree", "rm"):
        q = actions.add_parser(name, help=f"{name} image(s)")
        if name != "list":
            q.add_argument("name", metavar="NAME")
    for q in (add, *[actions.choices[n] for n in ("list", "show", "tree", "rm")]):
        add_volt_option(q)
        add_client_options(q)
        q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.runtime import run_async

    credentials = client_credentials(args, args.volt)

    async def call() -> int:
        async with credentials.api(args.volt, timeout=IMAGE_REGISTER_TIMEOUT_SECONDS) as api:
            if args.action == "add":
                doc = await api.post(
                    "/images",
                    json={"name": args.name, "origins": args.origin, "chunk_size": args.chunk_size},
                )
            elif args.action == "list":
                doc = await api.get("/images")
            elif args.action == "show":
                doc = await api.get(f"/images/{args.name}")
            elif args.action == "tree":
                doc = await api.get(f"/images/{args.name}/tree")
            else:
                await api.delete(f"/images/{args.name}")
                return 0
        print_json(doc)
        return 0

    return run_async(call())
