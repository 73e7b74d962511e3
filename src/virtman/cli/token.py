"""``virtman token``: credentials for Volt's and the agents' HTTP APIs.

    virtman token issue ROLE NAME --tokens FILE [--out FILE]

Makes a random token for ROLE (``operator``: the CLI; ``viewer``: read-only
dashboards and metrics; ``agent``: a compute host, NAME being its ``--name``), adds
its SHA-256 hash to the tokens FILE (created 0600) and prints the token once, or
writes it to ``--out`` (0600). Give FILE to Volt and every agent (``--tokens``); they
read it at start. To revoke a token, delete its line and restart them.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "token",
        help="issue tokens for the HTTP APIs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="token_command", required=True, parser_class=type(p))
    issue = actions.add_parser("issue", help="make a token; its hash goes to --tokens")
    issue.add_argument("role", metavar="ROLE", choices=["operator", "viewer", "agent"])
    issue.add_argument("name", metavar="NAME", help="who holds it (an agent: its --name)")
    issue.add_argument(
        "--tokens", required=True, metavar="FILE", help="the tokens file Volt and agents read"
    )
    issue.add_argument(
        "--out", metavar="FILE", help="write the token here (0600) instead of printing it"
    )
    issue.set_defaults(run=run_issue)


def run_issue(args: argparse.Namespace) -> int:
    from virtman.auth import issue_token, parse_role, write_secret

    token = issue_token(args.tokens, parse_role(args.role), args.name)
    if args.out:
        write_secret(args.out, token)
        print(f"{args.role} {args.name}: token written to {args.out}, hash added to {args.tokens}")
    else:
        print(token)
    return 0
