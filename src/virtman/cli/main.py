"""The ``virtman`` command.

Errors in the command line, and settings that cannot work, end with one line on
standard error and exit status 2; failures at run time (an upstream that cannot be
reached, a file that cannot be opened) with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, NoReturn, Protocol

from virtman import __version__
from virtman.errors import ConfigError, VirtmanError

EXIT_USAGE = 2
EXIT_FAILURE = 1

#: Entry-point group through which another distribution adds a subcommand. The
#: benchmarks and the simulator are tools, not the product: they ship apart (tools/bench)
#: and plug ``bench`` in here, so the services neither import nor need them.
COMMANDS_GROUP = "virtman.commands"
#: Subcommands that other distributions provide, and how to install each one.
OPTIONAL_COMMANDS = {
    "bench": "pip install ./tools/bench (in the source tree) or bash scripts/install.sh",
}


class Command(Protocol):
    """What an entry point of ``COMMANDS_GROUP`` loads (a module, usually)."""

    def add_parser(self, sub: Any) -> None:
        """Add the subcommand, whose ``run(args) -> int`` is set as a default."""

    def run_unparsed(self, argv: list[str]) -> int | None:
        """Run a form that parses its own options (``argv`` follows the command's name),
        or return None to leave ``argv`` to the parser."""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are a single line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="virtman", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"virtman {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    from virtman.cli import agent, bake, ca, digest, image, replay, serve, token, up, vm, volt

    serve.add_parser(sub)
    digest.add_parser(sub)
    volt.add_parser(sub)
    image.add_parser(sub)
    agent.add_parser(sub)
    vm.add_parser(sub)
    bake.add_parser(sub)
    up.add_parser(sub)
    replay.add_parser(sub)
    for name in OPTIONAL_COMMANDS:
        command = find_command(name)
        if isinstance(command, str):
            _add_missing(sub, name, command)
        else:
            command.add_parser(sub)
    ca.add_parser(sub)
    token.add_parser(sub)
    return parser


@functools.cache
def find_command(name: str) -> Command | str:
    """The subcommand ``name`` an installed distribution provides, or the line saying why
    there is none and how to get it."""
    how = OPTIONAL_COMMANDS[name]
    found = list(entry_points(group=COMMANDS_GROUP, name=name))
    if not found:
        return f"virtman {name}: not installed; install it with: {how}"
    try:
        command: Command = found[0].load()
    except ImportError as err:
        return f"virtman {name}: installed but cannot be loaded ({err}); reinstall it with: {how}"
    return command


def _add_missing(sub: Any, name: str, line: str) -> None:
    """A stand-in for an uninstalled subcommand: whatever follows it, one line and exit 2."""
    # prefix_chars that no argument starts with: options meant for the real command
    # (``--hosts``, ``--help``) are taken as plain words instead of failing to parse.
    p = sub.add_parser(name, help=f"not installed; install with: {OPTIONAL_COMMANDS[name]}",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")

    def run(args: argparse.Namespace) -> int:
        print(line, file=sys.stderr)
        return EXIT_USAGE

    p.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Some forms of a plugged-in command (``bench nbd``) parse their own options: offer
    # them everything after the command's name before the parser sees it.
    if argv[:1] and argv[0] in OPTIONAL_COMMANDS:
        command = find_command(argv[0])
        if not isinstance(command, str):
            unparsed = command.run_unparsed(argv[1:])
            if unparsed is not None:
                return unparsed
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except ConfigError as err:
        print(f"virtman {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except VirtmanError as err:
        print(f"virtman {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
