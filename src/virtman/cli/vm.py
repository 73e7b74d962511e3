"""``virtman vm``: the VM API of an agent (the paper's Table 2).

    virtman vm create NAME --image IMG | --from-snapshot VM/SNAP   [--agent URL]
    virtman vm create NAME --from-bake BAKE --start [--cpus N] [--memory MIB]
    virtman vm destroy NAME [--instance-only]                      [--agent URL]
    virtman vm snapshot NAME SNAP                                  [--agent URL]
    virtman vm clone NAME DEST_AGENT                               [--agent URL]
    virtman vm migrate NAME DEST_AGENT                             [--agent URL]
    virtman vm list                                                [--agent URL]
    virtman vm start NAME [GUEST OPTIONS] [--record]               [--agent URL]
    virtman vm stop | console | xml | trace NAME                   [--agent URL]

GUEST OPTIONS (also on ``create --start``): --kernel FILE --initrd FILE --append TEXT
--memory MIB --cpus N --accel auto|kvm|tcg. The guest is QEMU on the VM's export, its
serial console logged (``console``). ``--accel`` defaults to the agent's ``--accel``
(``auto``: KVM only where a Linux kernel is seen to boot under it, else TCG). ``xml``
prints a libvirt domain for ``virsh define``. ``--record`` keeps every disk request of
the guest as a boot trace (``trace`` prints it once the guest has exited).

``create`` prints the VM's NBD URI (give it to QEMU: ``-drive file=URI,format=raw``).
``create --from-bake`` resumes the bake's guest (``virtman bake``) instead of booting
one, hot-plugged up to ``--cpus`` and ``--memory``, and prints ``resume_seconds`` (the
request to the guest running) after the URI.
``list`` prints a table on a terminal; piped, or with ``--json``, the JSON document.
DEST_AGENT is an agent's name: the source agent looks its address up in Volt and
sends the VM only there (never to a URL given here).

Every command needs an operator token (``--token-file FILE``, ``--token`` or
``$VIRTMAN_TOKEN``) and verifies the agent against ``--tls-ca`` (or
``$VIRTMAN_TLS_CA``); see ``virtman token issue``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from virtman.cli.common import (
    add_agent_option,
    add_client_options,
    client_credentials,
    print_json,
)
from virtman.hypervisor.options import add_accel_option
from virtman.limits import VM_CREATE_TIMEOUT_SECONDS


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
    source.add_argument("--from-bake", metavar="BAKE", help="resume a bake (with --start)")
    create.add_argument("--start", action="store_true", help="boot a QEMU guest on it at once")
    _guest_options(create)
    start = actions.add_parser("start", help="boot a QEMU guest on the VM's disk")
    start.add_argument("name", metavar="NAME")
    _guest_options(start)
    for verb, text in (
        ("stop", "stop the VM's guest"),
        ("console", "print its serial log"),
        ("xml", "print a libvirt domain using its NBD disk"),
        ("trace", "print its recorded boot trace"),
    ):
        q = actions.add_parser(verb, help=text)
        q.add_argument("name", metavar="NAME")
        if verb == "trace":
            q.add_argument("-o", "--output", metavar="FILE", help="write it here")
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
    listing = actions.add_parser("list", help="list the agent's VMs")
    listing.add_argument("--json", action="store_true", help="print JSON on a terminal too")
    for q in actions.choices.values():
        add_agent_option(q)
        add_client_options(q)
        q.set_defaults(run=run)


def _guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="FILE", help="boot this kernel (else the disk boots)")
    p.add_argument("--initrd", metavar="FILE")
    p.add_argument("--append", metavar="TEXT", help="kernel command line")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest memory (default 512)")
    p.add_argument("--cpus", type=int, metavar="N", help="guest CPUs (default 1)")
    p.add_argument("--record", action="store_true", help="record the boot as a trace")
    add_accel_option(p, default=None)


def _guest(args: argparse.Namespace) -> dict[str, Any] | None:
    import os

    spec: dict[str, Any] = {}
    for key, value in (("kernel", args.kernel), ("initrd", args.initrd)):
        if value is not None:
            spec[key] = os.path.abspath(value)  # the agent resolves paths, not the CLI's cwd
    if args.append is not None:
        spec["append"] = args.append
    if args.memory is not None:
        spec["memory_mib"] = args.memory
    if args.cpus is not None:
        spec["cpus"] = args.cpus
    return spec or None


def run(args: argparse.Namespace) -> int:
    from virtman.cli.console import is_terminal
    from virtman.runtime import run_async

    credentials = client_credentials(args, args.agent)

    async def call() -> int:
        async with credentials.api(args.agent, timeout=VM_CREATE_TIMEOUT_SECONDS) as api:
            if args.action == "create":
                body = {"name": args.name}
                if args.image:
                    body["image"] = args.image
                elif args.from_bake:
                    body.update(from_bake=args.from_bake, start=args.start)
                    for key, value in (("cpus", args.cpus), ("memory_mib", args.memory)):
                        if value is not None:
                            body[key] = value
                    doc = await api.post("/vms", json=body)
                    print(doc["uri"])
                    print(f"resume_seconds {doc['resume_seconds']}")
                    return 0
                else:
                    body["from_snapshot"] = args.from_snapshot
                if args.start:
                    body.update(start=True, record=args.record)
                    if args.accel is not None:
                        body["accel"] = args.accel
                    if _guest(args):
                        body["guest"] = _guest(args)
                doc = await api.post("/vms", json=body)
                print(doc["uri"])
                return 0
            if args.action == "start":
                start: dict[str, Any] = {"guest": _guest(args), "record": args.record}
                if args.accel is not None:
                    start["accel"] = args.accel
                doc = await api.post(f"/vms/{args.name}/start", json=start)
            elif args.action == "stop":
                doc = await api.post(f"/vms/{args.name}/stop")
            elif args.action in ("console", "xml", "trace"):
                text = await api.get_text(f"/vms/{args.name}/{args.action}")
                if args.action == "trace" and args.output:
                    with open(args.output, "w", encoding="utf-8") as f:
                        f.write(text)
                else:
                    print(text, end="" if text.endswith("\n") else "\n")
                return 0
            elif args.action == "destroy":
                await api.delete(
                    f"/vms/{args.name}", params={"instance_only": str(args.instance_only).lower()}
                )
                return 0
            elif args.action == "snapshot":
                doc = await api.post(f"/vms/{args.name}/snapshots", json={"name": args.snapshot})
            elif args.action in ("clone", "migrate"):
                doc = await api.post(
                    f"/vms/{args.name}/{args.action}", json={"destination": args.destination}
                )
                if isinstance(doc, dict) and doc.get("live"):
                    _print_live(doc)
            else:  # list
                doc = await api.get("/vms")
                if not args.json and is_terminal():
                    _print_vms(doc)
                    return 0
        print_json(doc)
        return 0

    return run_async(call())


def _print_live(doc: dict[str, Any]) -> None:
    """One line for a person (stderr: stdout stays the JSON answer)."""
    from virtman.sizes import format_size

    what = "cloned" if doc.get("kept") else "migrated"
    print(
        f"{doc['name']} {what} live to {doc['destination']}: guest paused "
        f"{doc['downtime_ms']} ms (QEMU), {doc['measured_pause_seconds'] * 1000:.0f} ms "
        f"measured; moved {format_size(doc['ram_bytes'])} of memory"
        f"{' over TLS' if doc.get('memory_tls') else ''} + "
        f"{format_size(doc['disk_bytes'] + doc['live_read_bytes'])} of disk "
        f"in {doc['seconds']:.1f} s",
        file=sys.stderr,
    )


def _print_vms(vms: list[dict[str, Any]]) -> None:
    from virtman.cli.console import make_console, print_table
    from virtman.sizes import format_size

    print_table(
        make_console(),
        "VMs",
        ["name", "image", "state", "guest", "written", "snapshots", "NBD URI"],
        [
            [
                v["name"],
                v["image"],
                v["state"],
                ("running" if v["guest_running"] else "")
                + (" (recording)" if v["recording"] else ""),
                format_size(v["written_bytes"]),
                ", ".join(v["snapshots"]),
                v["uri"] or "",
            ]
            for v in vms
        ],
        right=["written"],
    )
