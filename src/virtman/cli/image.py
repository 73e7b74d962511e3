"""``virtman image``: the image registry of Volt.

    virtman image add NAME --origin URI [--origin URI ...] [--chunk-size 256K] [--volt URL]
    virtman image list | show NAME | tree NAME | rm NAME   [--volt URL]
    virtman image profile NAME [--export FILE | --import FILE | --from-trace CSV | --clear]

``add`` makes Volt read the image once from its origin and store its digest manifest;
an origin that cannot be reached is refused with the reason. On a terminal ``add`` draws
the manifest's progress (polled from Volt's ``GET /registrations/NAME`` while the POST
runs, with the same credentials) and ``add``, ``list`` and ``show`` print tables; piped,
or with ``--json``, they print the JSON documents.

``profile`` shows the image's boot profile: the chunks boots read, in the order they
first read them, merged from the boots agents recorded; agents prefetch it when they
attach the image. ``--export FILE`` writes it as JSON, ``--import FILE`` replaces it with
such a file, ``--from-trace CSV`` with the reads of a boot trace (t,op,offset,length,
as ``virtman replay`` records them), and ``--clear`` removes it (agents record it
again).

``add``, ``rm`` and changing a profile need an operator token, the others any token
(``--token-file FILE``, ``--token`` or ``$VIRTMAN_TOKEN``); Volt is verified against
``--tls-ca``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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

#: Profile entries ``image profile`` lists on a terminal (``--json`` gives them all).
PROFILE_SHOWN_ENTRIES = 12


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
    prof = actions.add_parser("profile", help="show, export, import or clear a boot profile")
    prof.add_argument("name", metavar="NAME")
    change = prof.add_mutually_exclusive_group()
    change.add_argument("--export", metavar="FILE", help="write the profile to FILE (JSON)")
    change.add_argument("--import", dest="import_file", metavar="FILE",
                        help="replace the profile with FILE (JSON, as --export writes it)")
    change.add_argument("--from-trace", metavar="CSV",
                        help="replace the profile with the reads of a boot trace")
    change.add_argument("--clear", action="store_true", help="remove the profile")
    prof.add_argument("--json", action="store_true", help="print JSON on a terminal too")
    add_volt_option(prof)
    add_client_options(prof)
    prof.set_defaults(run=run_profile)


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


def run_profile(args: argparse.Namespace) -> int:
    from virtman.cli.console import is_terminal, make_console
    from virtman.runtime import run_async

    credentials = client_credentials(args, args.volt)
    console = make_console() if is_terminal() and not args.json else None
    path = f"/images/{args.name}/profile"

    async def call() -> int:
        async with credentials.api(args.volt) as api:
            if args.clear:
                await api.delete(path)
                print(f"boot profile of {args.name} cleared")
                return 0
            if args.import_file or args.from_trace:
                doc = await api.put(path, json=await _profile_to_send(api, args))
            else:
                doc = await api.get(path)
        if args.export:
            keys = ("format", "chunk_size", "runs", "entries")
            _write_json(args.export, {k: doc[k] for k in keys})
            print(f"boot profile of {args.name}: {doc['chunks']} chunks written to {args.export}")
        elif console is not None:
            _print_profile(console, doc)
        else:
            print_json(doc)
        return 0

    return run_async(call())


async def _profile_to_send(api: ApiClient, args: argparse.Namespace) -> Any:
    """The document ``--import`` or ``--from-trace`` puts (Volt checks it)."""
    from virtman.errors import ConfigError

    if args.import_file:
        try:
            with open(args.import_file, encoding="utf-8") as f:
                return json.load(f)
        except OSError as err:
            raise ConfigError(f"cannot read {args.import_file}: {err.strerror}") from err
        except ValueError as err:
            raise ConfigError(f"{args.import_file} is not JSON: {err}") from err
    from virtman.planner.profile import profile_from_trace
    from virtman.replay.trace import load_trace

    image = await api.get(f"/images/{args.name}")
    trace = load_trace(args.from_trace)
    rows = ((r.t, r.op, r.offset, r.length) for r in trace.requests)
    return profile_from_trace(rows, int(image["chunk_size"]), int(image["size"])).to_doc()


def _write_json(path: str, doc: Any) -> None:
    from virtman.durable import write_atomic

    write_atomic(path, json.dumps(doc).encode() + b"\n", 0o644)


def _print_profile(console: Console, doc: dict[str, Any]) -> None:
    from virtman.cli.console import print_table

    entries = doc["entries"]
    share = doc["bytes"] / doc["image_bytes"] if doc["image_bytes"] else 0.0
    last = entries[-1][1] if entries else 0.0
    console.print(
        f"boot profile of {doc['image']}: {doc['runs']} runs, {doc['chunks']} chunks of "
        f"{format_size(doc['chunk_size'])}, {format_size(doc['bytes'])} "
        f"({share:.1%} of the image), first reads over {last:.1f} s"
    )
    print_table(
        console,
        f"first {min(len(entries), PROFILE_SHOWN_ENTRIES)} chunks, in first-read order",
        ["chunk", "offset", "first read (s)", "runs that read it"],
        [[str(c), format_size(c * doc["chunk_size"]), f"{t:.3f}", str(n)]
         for c, t, n in entries[:PROFILE_SHOWN_ENTRIES]],
        right=["chunk", "offset", "first read (s)", "runs that read it"],
    )


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
