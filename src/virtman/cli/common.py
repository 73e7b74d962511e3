"""Defaults and helpers shared by the subcommands that talk to virtman services."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_VOLT_LISTEN = "127.0.0.1:8780"
DEFAULT_AGENT_LISTEN = "127.0.0.1:8781"
DEFAULT_VOLT_URL = f"http://{DEFAULT_VOLT_LISTEN}"
DEFAULT_AGENT_URL = f"http://{DEFAULT_AGENT_LISTEN}"


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
