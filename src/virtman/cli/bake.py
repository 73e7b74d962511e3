"""``virtman bake``: prebaked µVMs (a booted guest's saved state and disk).

    virtman bake create NAME --image IMG (--ready-marker REGEX | --ready-after SECONDS)
                        [--memory MIB] [--cpus N] [--max-cpus N] [--max-memory MIB]
                        [--kernel FILE --initrd FILE --append TEXT] [--accel tcg|kvm|auto]
                        [--agent URL]
    virtman bake list                                              [--volt URL]
    virtman bake remove NAME                                       [--volt URL]

``create`` boots a guest of IMG on the agent, waits until REGEX is on its console (or
SECONDS passed), pauses it, saves its state and freezes its disk, and registers the bake
with Volt (as the images NAME.state and NAME.disk, served by that agent). Give the guest
room to grow with ``--max-cpus`` and ``--max-memory`` (its memory plus a multiple of
128 MiB): resumes hot-plug up to them. Resume with ``virtman vm create VM --from-bake
NAME --start [--cpus N] [--memory MIB]`` on any agent.

``remove`` forgets the bake in Volt (and its two images), then deletes it on the agent
that made it. Every command needs an operator token, except ``list`` (any token).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from virtman.cli.common import (
    add_agent_option,
    add_client_options,
    add_volt_option,
    client_credentials,
    print_json,
)
from virtman.errors import ApiError
from virtman.hypervisor.options import add_accel_option
from virtman.limits import BAKE_CREATE_TIMEOUT_SECONDS, HTTP_TIMEOUT_SECONDS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bake",
        help="bake µVMs (saved, booted guests) and list or remove them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    create = actions.add_parser("create", help="boot, wait, save: a bake other agents resume")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--image", metavar="IMG", required=True)
    ready = create.add_mutually_exclusive_group(required=True)
    ready.add_argument("--ready-marker", metavar="REGEX",
                       help="ready once this is on the guest's console")
    ready.add_argument("--ready-after", type=float, metavar="SECONDS",
                       help="ready this many seconds after QEMU starts")
    create.add_argument("--kernel", metavar="FILE", help="boot this kernel (else the disk boots)")
    create.add_argument("--initrd", metavar="FILE")
    create.add_argument("--append", metavar="TEXT", help="kernel command line")
    create.add_argument("--memory", type=int, metavar="MIB", help="memory baked (default 512)")
    create.add_argument("--cpus", type=int, metavar="N", help="CPUs baked (default 1)")
    create.add_argument("--max-cpus", type=int, metavar="N", help="most CPUs a resume plugs")
    create.add_argument("--max-memory", type=int, metavar="MIB",
                        help="most memory a resume plugs (memory + k x 128 MiB)")
    add_accel_option(create, default=None)
    add_agent_option(create)
    listing = actions.add_parser("list", help="list Volt's bakes")
    listing.add_argument("--json", action="store_true", help="print JSON on a terminal too")
    remove = actions.add_parser("remove", help="remove a bake (Volt's record and the agent's)")
    remove.add_argument("name", metavar="NAME")
    for q in (listing, remove):
        add_volt_option(q)
    for q in actions.choices.values():
        add_client_options(q)
        q.set_defaults(run=run)


def _guest(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for key, value in (("kernel", args.kernel), ("initrd", args.initrd)):
        if value is not None:
            spec[key] = os.path.abspath(value)  # the agent resolves paths, not the CLI's cwd
    for key, value in (("append", args.append), ("memory_mib", args.memory),
                       ("cpus", args.cpus), ("max_cpus", args.max_cpus),
                       ("max_memory_mib", args.max_memory)):
        if value is not None:
            spec[key] = value
    return spec


def run(args: argparse.Namespace) -> int:
    from virtman.cli.console import is_terminal
    from virtman.runtime import run_async

    url = args.agent if args.action == "create" else args.volt
    credentials = client_credentials(args, url)

    async def call() -> int:
        if args.action == "create":
            body: dict[str, Any] = {"name": args.name, "image": args.image,
                                    "guest": _guest(args)}
            if args.ready_marker is not None:
                body["ready_marker"] = args.ready_marker
            else:
                body["ready_after"] = args.ready_after
            if args.accel is not None:
                body["accel"] = args.accel
            async with credentials.api(url, timeout=BAKE_CREATE_TIMEOUT_SECONDS) as api:
                print_json(await api.post("/bakes", json=body))
            return 0
        async with credentials.api(url, timeout=HTTP_TIMEOUT_SECONDS) as volt:
            if args.action == "list":
                doc = await volt.get("/bakes")
                if not args.json and is_terminal():
                    _print_bakes(doc)
                else:
                    print_json(doc)
                return 0
            # remove: Volt first, so no resume starts from it meanwhile; then its files.
            record = await volt.get(f"/bakes/{args.name}")
            agent = await volt.get(f"/agents/{record['agent']}")
            await volt.delete(f"/bakes/{args.name}")
        async with credentials.api(agent["url"], timeout=HTTP_TIMEOUT_SECONDS) as api:
            try:
                await api.delete(f"/bakes/{args.name}")
            except ApiError as err:
                if err.status != 404:
                    raise
                # The agent had lost it already: nothing left to delete there.
        return 0

    return run_async(call())


def _print_bakes(bakes: list[dict[str, Any]]) -> None:
    from virtman.cli.console import make_console, print_table
    from virtman.sizes import format_size

    def size(b: dict[str, Any]) -> str:
        g = b["guest"]
        cpus = f"{g['cpus']}-{g['max_cpus'] or g['cpus']} CPUs"
        mib = f"{g['memory_mib']}-{g['max_memory_mib'] or g['memory_mib']} MiB"
        return f"{cpus}, {mib}"

    print_table(
        make_console(),
        "bakes",
        ["name", "image", "agent", "size", "state", "ready", "accel"],
        [[b["name"], b["image"], b["agent"], size(b), format_size(b["state_bytes"]),
          b["ready"], b["accel"]] for b in bakes],
        right=["state"],
    )
