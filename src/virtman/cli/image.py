"""``virtman image``: the image registry of Volt.

    virtman image add NAME --origin URI [--origin URI ...] [--chunk-size 256K] [--volt URL]
    virtman image list | show NAME | tree NAME | rm NAME   [--volt URL]

``add`` makes Volt read the image once from its origin and store its digest manifest;
an origin that cannot be reached is refused with the reason. On a terminal ``add`` draws
the manifest's progress (polled from Volt's ``GET /registrations/NAME`` while the POST
runs, with the same credentials) and ``add``, ``list`` and ``show`` print tables; piped,
or with ``--json``, they print the JSON documents.

``add`` and ``rm`` need an operator token, the others any token (``--token-file FILE``,
``--token`` or ``$VIRTMAN_TOKEN``); Volt is verified against ``--tls-ca``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from virtman.cli.common import (
    add_client_options,
    add_volt_option,
    client_credentials,
    print_json,
)
from virtman.limits import (
    DEFAULT_CHUNK_SIZE,
    IMAGE_REGISTER_TIMEOUT_SECONDS,
    PROGRESS_REFRESH_SECONDS,
    REGISTRATION_POLL_SECONDS,
)
from virtman.sizes import format_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console

    from virtman.httpapi import ApiClient

log = logging.getLogger(__name__)


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
    for q in (add, actions.choices["list"], actions.choices["show"]):
        q.add_argument("--json", action="store_true", help="print JSON on a terminal too")


def run(args: argparse.Namespace) -> int:
    from virtman.cli.console import is_terminal, make_console
    from virtman.runtime import run_async

    credentials = client_credentials(args, args.volt)
    console = make_console() if is_terminal() and not getattr(args, "json", False) else None

    async def call() -> int:
        async with credentials.api(args.volt, timeout=IMAGE_REGISTER_TIMEOUT_SECONDS) as api:
            if args.action == "add":
                body = {"name": args.name, "origins": args.origin, "chunk_size": args.chunk_size}
                if console is None:
                    doc = await api.post("/images", json=body)
                else:
                    doc = await _add_showing_progress(api, body, console)
            elif args.action == "list":
                doc = await api.get("/images")
            elif args.action == "show":
                doc = await api.get(f"/images/{args.name}")
            elif args.action == "tree":
                doc = await api.get(f"/images/{args.name}/tree")
            else:
                await api.delete(f"/images/{args.name}")
                return 0
        if console is not None and args.action in ("add", "show", "list"):
            _print_images(console, doc if args.action == "list" else [doc])
        else:
            print_json(doc)
        return 0

    return run_async(call())


async def _add_showing_progress(api: ApiClient, body: dict[str, Any], console: Console) -> Any:
    """POST the registration while polling how far Volt's manifest is, and draw it.

    Volt answers the POST only once the manifest is whole, so the progress comes from a
    second, small request every ``REGISTRATION_POLL_SECONDS``. Before Volt has begun (and
    after it is done) the poll is a 404: the bars just wait.
    """
    from virtman.cli.console import RichDisplay
    from virtman.errors import VirtmanError
    from virtman.progress import Meter

    seen: dict[str, int] = {"chunks": 0, "chunks_done": 0}

    async def poll() -> None:
        while True:
            await asyncio.sleep(REGISTRATION_POLL_SECONDS)
            try:
                seen.update(await api.get(f"/registrations/{body['name']}"))
            except VirtmanError as err:  # the progress is a view: the POST's answer decides
                log.debug("registration progress: %s", err)

    meter = Meter("chunks hashed", lambda: seen["chunks_done"], lambda: seen["chunks"] or None)
    display = RichDisplay(console, PROGRESS_REFRESH_SECONDS)
    async with display.step(f"manifest of {body['name']}", [meter]):
        polling = asyncio.get_running_loop().create_task(poll(), name="registration progress")
        try:
            doc = await api.post("/images", json=body)
            # Registered: every chunk was hashed, whatever the last poll had seen.
            seen["chunks_done"] = seen["chunks"]
            return doc
        finally:
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling


def _print_images(console: Console, images: list[dict[str, Any]]) -> None:
    from virtman.cli.console import print_table

    print_table(
        console,
        "images",
        ["name", "size", "chunk size", "fingerprint", "origins"],
        [
            [
                i["name"],
                format_size(i["size"]),
                format_size(i["chunk_size"]),
                i["fingerprint"][:16],
                "\n".join(i["origins"]),
            ]
            for i in images
        ],
        right=["size", "chunk size"],
    )
