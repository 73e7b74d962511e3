"""``virtman vm``: the VM API of an agent (the paper's Table 2).

    virtman vm create NAME --image IMG | --from-snapshot VM/SNAP   [--agent URL]
    virtman vm destroy NAME [--instance-only]                      [--agent URL]
    virtman vm snapshot NAME SNAP                                  [--agent URL]
    virtman vm clone NAME DEST_AGENT                               [--agent URL]
    virtman vm migrate NAME DEST_AGENT                             [--agent URL]
    virtman vm list                                                [--agent URL]

``create`` prints the VM's NBD URI (give it to QEMU: ``-drive file=URI,format=raw``).
DEST_AGENT is an agent's name (looked up in Volt by the source agent) or its URL.
"""

from __future__ import annotations

import argparse
from typing import Any

from virtman.cli.common import add_agent_option, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vm",
        help="create, destroy, snapshot, clone, migrate, list VMs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    create = actions.add_parser("create", help="create a VM; prints its NBD URI")
    create.add_argument("name", metavar="NAME")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="IMG")
    source.add_argument("--from-snapshot", metavar="VM/SNAP")
    destroy = actions.add_parser("destroy", help="destroy a VM")
    destroy.add_argument("name", metavar="NAME")
    destroy.add_argument(
        "--instance-only",
        action="store_true",
        help="stop serving it but keep its disk (create NAME again to reattach)",
    )
    snap = actions.add_parser("snapshot", help="freeze the VM's disk as a named layer")
    snap.add_argument("name", metavar="NAME")
    snap.add_argument("snapshot", metavar="SNAP")
    for verb in ("clone", "migrate"):
        q = actions.add_parser(verb, help=f"{verb} a VM's written data to another agent")
        q.add_argument("name", metavar="NAME")
        q.add_argument("destination", metavar="DEST_AGENT")
    actions.add_parser("list", help="list the agent's VMs")
    for q in actions.choices.values():
        add_agent_option(q)
        q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.httpapi import ApiClient
    from virtman.runtime import run_async

    async def call() -> int:
        async with ApiClient(args.agent, timeout=3600) as api:
            if args.action == "create":
                body = {"name": args.name}
                if args.image:
                    body["image"] = args.image
                else:
                    body["from_snapshot"] = args.from_snapshot
                doc = await api.post("/vms", json=body)
                print(doc["uri"])
                return 0
            if args.action == "destroy":
                await api.delete(
                    f"/vms/{args.name}", params={"instance_only": str(args.instance_only).lower()}
                )
                return 0
            if args.action == "snapshot":
                doc = await api.post(f"/vms/{args.name}/snapshots", json={"name": args.snapshot})
            elif args.action in ("clone", "migrate"):
                doc = await api.post(
                    f"/vms/{args.name}/{args.action}", json={"destination": args.destination}
                )
            else:
                doc = await api.get("/vms")
        print_json(doc)
        return 0

    return run_async(call())
