"""``virtman ca``: a CA and host certificates for a cluster's TLS.

    virtman ca init DIR
    virtman ca issue NAME DIR [--host H ...] [--ca-dir CADIR]

``init`` writes DIR/ca.crt and DIR/ca.key (0600). ``issue`` writes DIR/NAME.crt and
DIR/NAME.key (0600), signed by the CA in CADIR (default: DIR itself), valid for every
--host (IP address or DNS name; default 127.0.0.1, localhost and ::1). Give a host
``--tls-cert DIR/NAME.crt --tls-key DIR/NAME.key --tls-ca CADIR/ca.crt``.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ca",
        help="make a CA and host certificates for TLS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ca_sub = p.add_subparsers(dest="ca_command", required=True, parser_class=type(p))
    init = ca_sub.add_parser("init", help="make a new CA in DIR")
    init.add_argument("directory", metavar="DIR")
    init.set_defaults(run=run_init)
    iss = ca_sub.add_parser("issue", help="issue a host certificate signed by the CA")
    iss.add_argument("name", metavar="NAME", help="the host's name (CN, and the file names)")
    iss.add_argument("directory", metavar="DIR", help="where NAME.crt and NAME.key go")
    iss.add_argument(
        "--ca-dir", metavar="CADIR", help="directory of ca.crt and ca.key (default: DIR)"
    )
    iss.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="IP address or DNS name the certificate is valid for; repeat "
        "(default 127.0.0.1, localhost, ::1)",
    )
    iss.set_defaults(run=run_issue)


def run_init(args: argparse.Namespace) -> int:
    from virtman.pki import init_ca

    files = init_ca(args.directory)
    print(f"CA certificate {files.cert}, key {files.key}")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    from virtman.pki import DEFAULT_HOSTS, issue

    hosts = args.host or list(DEFAULT_HOSTS)
    files = issue(args.name, args.directory, args.ca_dir or args.directory, hosts=hosts)
    print(f"certificate {files.cert}, key {files.key}, CA {files.ca}")
    return 0
