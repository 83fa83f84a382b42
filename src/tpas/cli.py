"""``tpas`` entry point: a thin argparse layer over library functions.

Each subcommand group lives in ``tpas.commands.<module>`` with a ``register(subparsers)`` function;
heavy imports happen inside the command functions, so ``tpas --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from tpas import __version__
from tpas.commands import data, demo, evaluate, fuse, models, search, select, serve, synth, train
from tpas.errors import TpasError

if TYPE_CHECKING:
    from tpas.data.images import SkippedImages

__all__ = ["build_parser", "main"]

COMMANDS = (data, synth, select, train, search, evaluate, fuse, serve, demo, models)  # in help order


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
    from tpas.data.images import bad_image_policy, skipped  # after parsing: `tpas --help` stays fast

    skipped.reset()
    try:
        with bad_image_policy(getattr(args, "on_bad_image", None) or "error"):
            result = args.func(args)
    except (TpasError, OSError, ValueError, KeyError) as exc:  # OSError: permissions, a full disk, ...
        if args.verbose:
            raise
        report_skipped(args.command, skipped)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tpas {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        report_skipped(args.command, skipped)
        print(f"tpas {args.command}: interrupted", file=sys.stderr)
        return 130
    report_skipped(args.command, skipped)
    return int(result or 0)


def report_skipped(command: str, skipped: SkippedImages) -> None:
    """What ``--on-bad-image skip`` left out, as the last thing the user reads (nothing is skipped silently)."""
    if skipped.count:
        print(f"tpas {command}: {skipped.summary()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
