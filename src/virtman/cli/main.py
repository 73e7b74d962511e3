"""The ``virtman`` command.

Errors in the command line, and settings that cannot work, end with one line on
standard error and exit status 2; failures at run time (an upstream that cannot be
reached, a file that cannot be opened) with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from virtman import __version__
from virtman.errors import ConfigError, VirtmanError

EXIT_USAGE = 2
EXIT_FAILURE = 1


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
    from virtman.cli import agent, bench, ca, digest, image, replay, serve, token, up, vm, volt

    serve.add_parser(sub)
    digest.add_parser(sub)
    volt.add_parser(sub)
    image.add_parser(sub)
    agent.add_parser(sub)
    vm.add_parser(sub)
    up.add_parser(sub)
    replay.add_parser(sub)
    bench.add_parser(sub)
    ca.add_parser(sub)
    token.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Benchmarks parse their own options: hand them everything after their name.
    if argv[:2] == ["bench", "nbd"]:
        from virtman.bench.nbd import main as bench_nbd

        return bench_nbd(argv[2:])
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
