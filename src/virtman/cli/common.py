"""Defaults and helpers shared by the subcommands that talk to virtman services.

Credentials (see docs/control-plane.md, "Credentials and TLS"):

- Services (``volt``, ``agent``) serve HTTPS with ``--tls-cert --tls-key --tls-ca`` and
  check every request against ``--tokens FILE`` (hashes, ``virtman token issue``) and,
  over TLS, the client certificates their CA signed (agents). ``--insecure`` serves
  plain HTTP instead; credentials are still required.
- The CLI sends a token from ``--token-file FILE``, ``--token TOKEN`` or the
  environment (``VIRTMAN_TOKEN``), and verifies ``https://`` services against
  ``--tls-ca FILE`` (or ``VIRTMAN_TLS_CA``; else the system's CAs). It sends a token
  over plain ``http://`` only with ``--insecure``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from virtman.errors import ConfigError
from virtman.httpapi import Credentials
from virtman.tlsconfig import TlsFiles, add_tls_options, tls_files

DEFAULT_VOLT_LISTEN = "127.0.0.1:8780"
DEFAULT_AGENT_LISTEN = "127.0.0.1:8781"
DEFAULT_VOLT_URL = f"https://{DEFAULT_VOLT_LISTEN}"
DEFAULT_AGENT_URL = f"https://{DEFAULT_AGENT_LISTEN}"

TOKEN_ENV = "VIRTMAN_TOKEN"
TLS_CA_ENV = "VIRTMAN_TLS_CA"

if TYPE_CHECKING:
    from virtman.auth import Authenticator

_INSECURE_SERVICE = "serve plain HTTP instead of HTTPS (credentials are still required)"


def add_volt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--volt",
        default=DEFAULT_VOLT_URL,
        metavar="URL",
        help=f"Volt's URL (default {DEFAULT_VOLT_URL})",
    )


def add_agent_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent",
        default=DEFAULT_AGENT_URL,
        metavar="URL",
        help=f"the agent's URL (default {DEFAULT_AGENT_URL})",
    )


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# --- the CLI as a client ------------------------------------------------------------------


def add_client_options(p: argparse.ArgumentParser) -> None:
    """The credential options of a command that calls a service (``client_credentials``)."""
    g = p.add_argument_group("credentials")
    g.add_argument(
        "--token-file", metavar="FILE", help="read the token from FILE (its first line)"
    )
    g.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the token itself (visible to other local users in the process list; "
        f"prefer --token-file or {TOKEN_ENV})",
    )
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get(TLS_CA_ENV),
        help=f"CA certificate to verify the service by (default ${TLS_CA_ENV}, else the "
        f"system's CAs)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain http:// URL (the token then crosses the network readable)",
    )


def client_credentials(args: argparse.Namespace, url: str) -> Credentials:
    """The token and CA the CLI calls ``url`` with. ``ConfigError`` when there is no
    token, or ``url`` is plain http:// without ``--insecure``."""
    from virtman.auth import read_token_file

    token: str | None = (
        read_token_file(args.token_file)
        if args.token_file
        else args.token or os.environ.get(TOKEN_ENV)
    )
    if not token:
        raise ConfigError(
            f"no credential: give --token-file FILE, --token TOKEN or set {TOKEN_ENV} "
            f"(virtman token issue operator NAME --tokens FILE makes one)"
        )
    if url.startswith("http://") and not args.insecure:
        raise ConfigError(
            f"{url} is plain HTTP: use https:// or, to send the token unencrypted, --insecure"
        )
    return Credentials(token=token.strip(), ca=args.tls_ca)


# --- services -----------------------------------------------------------------------------


def add_service_security_options(p: argparse.ArgumentParser, *, agent: bool = False) -> None:
    """``--tls-cert --tls-key --tls-ca``, ``--tokens FILE``, ``--insecure``; agents
    also ``--token-file FILE`` (their own token, for Volt and the other agents)."""
    add_tls_options(p)
    p.add_argument(
        "--tokens",
        required=True,
        metavar="FILE",
        help="the tokens this service accepts (hashes; virtman token issue writes them)",
    )
    if agent:
        p.add_argument(
            "--token-file",
            metavar="FILE",
            help="this agent's own token, sent to Volt and to other agents (needed "
            "without TLS; with TLS its certificate identifies it)",
        )
    p.add_argument("--insecure", action="store_true", help=_INSECURE_SERVICE)


def service_security(args: argparse.Namespace) -> tuple[TlsFiles | None, Authenticator]:
    """A service's TLS files (None: ``--insecure``) and its ``auth.Authenticator``.
    ``ConfigError`` when TLS is neither configured nor declined, or both."""
    from virtman.auth import Authenticator, TokenFile

    tls = tls_files(args)
    if tls is None and not args.insecure:
        raise ConfigError(
            "give --tls-cert, --tls-key and --tls-ca, or --insecure to serve plain HTTP"
        )
    if tls is not None and args.insecure:
        raise ConfigError("--insecure and --tls-* contradict each other: give one")
    return tls, Authenticator(TokenFile(args.tokens), certificates=tls is not None)


def agent_credentials(args: argparse.Namespace, tls: TlsFiles | None) -> Credentials:
    """What an agent presents to Volt and to other agents: its certificate, its token."""
    from virtman.auth import read_token_file

    token = read_token_file(args.token_file) if args.token_file else None
    if tls is None and token is None:
        raise ConfigError(
            "an agent without TLS is known to Volt only by its token: give --token-file"
        )
    return Credentials(token=token, tls=tls)
