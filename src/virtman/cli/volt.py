"""``virtman volt``: run the coordinator.

    virtman volt --listen HOST:PORT --db PATH --tokens FILE
                 (--tls-cert FILE --tls-key FILE --tls-ca FILE | --insecure)
                 [--fanout 2] [--parents 2] [--heartbeat-interval 2] [--heartbeat-timeout 6]

State lives in the SQLite file PATH: a restarted Volt resumes its images and trees.
SIGTERM or SIGINT stops it cleanly.

Volt serves HTTPS with the TLS files and takes requests only with a credential: a
token from ``--tokens`` (operators, viewers, agents) or an agent's client certificate
signed by ``--tls-ca``. ``--insecure`` serves plain HTTP, tokens still required.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from virtman.cli.common import (
    DEFAULT_VOLT_LISTEN,
    add_service_security_options,
    service_security,
)
from virtman.limits import (
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
)
from virtman.protocol.uri import parse_listen

log = logging.getLogger("virtman.volt")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "volt",
        help="run the Volt coordinator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_VOLT_LISTEN,
        metavar="HOST:PORT",
        help=f"HTTP address (default {DEFAULT_VOLT_LISTEN})",
    )
    p.add_argument("--db", required=True, metavar="PATH", help="SQLite state file")
    p.add_argument("--fanout", type=int, default=TREE_FANOUT, help="children per tree node")
    p.add_argument(
        "--parents", type=int, default=TREE_PARENTS_PER_NODE, help="parents per tree node"
    )
    p.add_argument(
        "--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_SECONDS, metavar="SECONDS"
    )
    p.add_argument(
        "--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_SECONDS, metavar="SECONDS"
    )
    add_service_security_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtman.coordinator.app import create_app
    from virtman.coordinator.state import VoltState
    from virtman.coordinator.volt import Volt
    from virtman.httpapi import HttpService, bind
    from virtman.runtime import configure_logging, run_async

    host, port = parse_listen(args.listen)
    tls, authenticator = service_security(args)
    # A fan-out the planner refuses is a PlannerError, a ConfigError: exit status 2.
    volt = Volt(
        VoltState(args.db),
        fanout=args.fanout,
        parents_per_node=args.parents,
        interval=args.heartbeat_interval,
        timeout=args.heartbeat_timeout,
    )
    configure_logging(args.log_level)

    async def main() -> int:
        service = HttpService(
            create_app(volt, authenticator=authenticator), bind(host, port), tls=tls
        )
        return await service.run_until_signalled("volt")

    return run_async(main())
