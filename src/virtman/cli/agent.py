"""``virtman agent``: run the compute agent of one host.

    virtman agent --volt URL --name HOST --listen HOST:PORT --data-dir DIR --tokens FILE
                  (--tls-cert FILE --tls-key FILE --tls-ca FILE | --insecure --token-file FILE)
                  [--cache-size SIZE] [--nbd-listen HOST:PORT] [--socket-dir DIR]
                  [--hypervisor-user USER] [--no-prefetch] [--prefetch-rate SIZE]
                  [--no-record]
                  [--accel auto|kvm|tcg] [--qemu PATH] [--accel-cache FILE]

The agent relays images to its children over NBD on ``--nbd-listen`` (default: the
``--listen`` host, any free port), exports each VM's disk on a Unix socket in
``--socket-dir`` (default ``DIR/sock``) and serves the VM API over HTTP on ``--listen``.
Its VMs, snapshots and cache live in ``DIR`` and survive a restart. SIGTERM or SIGINT
stops it cleanly.

The VM API is HTTPS with the TLS files; every request needs a credential (a token
from ``--tokens``, or another agent's certificate for ``/vms/import``). The agent
presents its certificate (CN = ``--name``) and/or ``--token-file`` to Volt and to the
agents it sends VMs to. ``--insecure``: plain HTTP, known by its token only. Export
sockets are 0600 in a 0700 directory, owned by ``--hypervisor-user`` (default: the
agent's own user; another user needs an agent running as root).

Boot profiles (docs/data-plane.md): the agent prefetches an image's boot profile from
its tree parents when it attaches the image (``--no-prefetch``: never; ``--prefetch-rate
SIZE``: at most SIZE bytes a second per image, e.g. ``50M``), and records the first reads
of new VMs for Volt until the profile has enough runs (``--no-record``: never).

Guests run under ``--accel`` (default ``auto``: KVM only where a Linux kernel is seen
to boot under it, see docs/guests.md); ``vm start --accel`` overrides it per guest.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from virtman.cli.common import (
    DEFAULT_AGENT_LISTEN,
    add_service_security_options,
    add_volt_option,
    agent_credentials,
    service_security,
)
from virtman.coordinator.models import NAME_PATTERN
from virtman.delivery import DeliveryMode
from virtman.errors import ConfigError
from virtman.limits import PROFILE_RECORD_SECONDS
from virtman.sizes import parse_size

if TYPE_CHECKING:
    from virtman.agent.relays import ProfileSettings
from virtman.hypervisor.options import add_hypervisor_options, hypervisor_settings
from virtman.limits import DEFAULT_CACHE_CAPACITY
from virtman.protocol.uri import parse_listen
from virtman.sizes import format_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the compute agent of this host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_volt_option(p)
    p.add_argument("--name", required=True, metavar="HOST", help="this host's name in Volt")
    p.add_argument(
        "--listen",
        default=DEFAULT_AGENT_LISTEN,
        metavar="HOST:PORT",
        help=f"HTTP address of the VM API (default {DEFAULT_AGENT_LISTEN})",
    )
    p.add_argument("--data-dir", required=True, metavar="DIR")
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=DEFAULT_CACHE_CAPACITY,
        metavar="SIZE",
        help=f"capacity of the cache group (default {format_size(DEFAULT_CACHE_CAPACITY)})",
    )
    p.add_argument(
        "--nbd-listen",
        metavar="HOST:PORT",
        help="NBD address of the relay exports (default: --listen host, any port)",
    )
    p.add_argument("--socket-dir", metavar="DIR", help="where VM sockets go (default DIR/sock)")
    p.add_argument(
        "--hypervisor-user",
        metavar="USER",
        help="the user the hypervisor runs as, who owns the VM sockets (default: this "
        "agent's user)",
    )
    p.add_argument(
        "--mode",
        choices=[m.value for m in DeliveryMode],
        default=DeliveryMode.VIRTMAN.value,
        help="how images reach this host; only 'virtman' is for production, the others "
        "are the alternatives the scale benchmark compares (default virtman)",
    )
    p.add_argument(
        "--attach-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="paper mode: seconds each tree level takes to attach",
    )
    p.add_argument("--no-prefetch", action="store_true",
                   help="never prefetch images' boot profiles (VMs read on demand only)")
    p.add_argument("--prefetch-rate", type=parse_size, metavar="SIZE",
                   help="bytes per second one image's prefetch may take at most (default: "
                   "no cap; VMs' reads go first anyway)")
    p.add_argument("--no-record", action="store_true",
                   help="never record VMs' first reads for the images' boot profiles")
    p.add_argument("--record-seconds", type=float, default=PROFILE_RECORD_SECONDS,
                   metavar="SECONDS",
                   help="how long from a new VM's creation its first reads are recorded "
                   f"(default {PROFILE_RECORD_SECONDS:g}): about a boot")
    add_hypervisor_options(p)
    add_service_security_options(p, agent=True)
    p.set_defaults(run=run)


def profile_settings(args: argparse.Namespace) -> ProfileSettings:
    """What ``--no-prefetch``, ``--prefetch-rate`` and ``--no-record`` ask for."""
    from virtman.agent.relays import ProfileSettings
    from virtman.blockdev.prefetch import PrefetchLimits

    if args.no_prefetch and args.prefetch_rate is not None:
        raise ConfigError("--no-prefetch and --prefetch-rate contradict each other: give one")
    if args.prefetch_rate is not None and args.prefetch_rate < 1:
        raise ConfigError(f"--prefetch-rate {args.prefetch_rate} must be at least 1 byte/s")
    if not args.record_seconds > 0:
        raise ConfigError(f"--record-seconds {args.record_seconds} must be above zero")
    limits = None if args.no_prefetch else PrefetchLimits(bytes_per_second=args.prefetch_rate)
    return ProfileSettings(prefetch=limits, record=not args.no_record,
                           record_seconds=args.record_seconds)


def run(args: argparse.Namespace) -> int:
    import re

    from virtman.agent.agent import Agent
    from virtman.agent.app import create_app
    from virtman.agent.vms import SocketOwner
    from virtman.httpapi import HttpService, bind
    from virtman.runtime import configure_logging, run_async

    if not re.match(NAME_PATTERN, args.name):
        raise ConfigError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    host, port = parse_listen(args.listen)
    nbd_host, nbd_port = parse_listen(args.nbd_listen) if args.nbd_listen else (host, 0)
    hypervisor = hypervisor_settings(args)
    tls, authenticator = service_security(args)
    credentials = agent_credentials(args, tls)
    owner = SocketOwner.named(args.hypervisor_user) if args.hypervisor_user else None
    profiles = profile_settings(args)
    configure_logging(args.log_level)

    async def main() -> int:
        agent = Agent(
            args.name,
            args.data_dir,
            args.volt,
            nbd_host=nbd_host,
            nbd_port=nbd_port,
            socket_dir=args.socket_dir,
            cache_capacity=args.cache_size,
            mode=DeliveryMode(args.mode),
            attach_delay=args.attach_delay,
            hypervisor=hypervisor,
            credentials=credentials,
            socket_owner=owner,
            profiles=profiles,
        )
        service = HttpService(
            create_app(agent, authenticator=authenticator), bind(host, port), tls=tls
        )
        agent.url = service.url
        return await service.run_until_signalled(f"agent {args.name}")

    return run_async(main())
