"""``tpas`` entry point: a thin argparse layer over library functions.

Each subcommand group lives in ``tpas.commands.<module>`` with a ``register(subparsers)`` function;
heavy imports happen inside the command functions, so ``tpas --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tpas import __version__
from tpas.commands import data, demo, evaluate, models, search, select, serve, synth, train
from tpas.errors import TpasError

__all__ = ["build_parser", "main"]

COMMANDS = (data, synth, select, train, search, evaluate, serve, demo, models)  # in help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpas", description="Text-based Person Anomaly Search")
    parser.add_argument("--version", action="version", version=f"tpas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (TpasError, FileNotFoundError, ValueError, KeyError) as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tpas {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tpas {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
