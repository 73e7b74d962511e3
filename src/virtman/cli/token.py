"""``virtman token``: credentials for Volt's and the agents' HTTP APIs.

    virtman token issue ROLE NAME --tokens FILE [--out FILE]
    virtman token revoke ROLE NAME --tokens FILE

Makes a random token for ROLE (``operator``: the CLI; ``viewer``: read-only
dashboards and metrics; ``agent``: a compute host, NAME being its ``--name``), adds
its SHA-256 hash to the tokens FILE (created 0600) and prints the token once, or
writes it to ``--out`` (0600). Give FILE to Volt and every agent (``--tokens``).
``revoke`` removes every token of ROLE NAME (the file is replaced whole). A running
service reads the file again within a second of a change: no restart either way.
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
    revoke = actions.add_parser("revoke", help="remove the tokens of ROLE NAME from --tokens")
    revoke.add_argument("role", metavar="ROLE", choices=["operator", "viewer", "agent"])
    revoke.add_argument("name", metavar="NAME", help="whose tokens to remove")
    revoke.add_argument(
        "--tokens", required=True, metavar="FILE", help="the tokens file Volt and agents read"
    )
    revoke.set_defaults(run=run_revoke)


def run_issue(args: argparse.Namespace) -> int:
    from virtman.auth import issue_token, parse_role, write_secret

    token = issue_token(args.tokens, parse_role(args.role), args.name)
    if args.out:
        write_secret(args.out, token)
        print(f"{args.role} {args.name}: token written to {args.out}, hash added to {args.tokens}")
    else:
        print(token)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from virtman.auth import parse_role, revoke_tokens
    from virtman.errors import NotFound

    removed = revoke_tokens(args.tokens, parse_role(args.role), args.name)
    if not removed:
        raise NotFound(f"no {args.role} token of {args.name!r} in {args.tokens}")
    print(f"{args.role} {args.name}: {removed} token(s) removed from {args.tokens}")
    return 0
