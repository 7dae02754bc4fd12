"""The ``fedmerge`` command line: a thin dispatcher over one module per sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.data.spec import SPEC_HELP

# Each module registers its own sub-commands; order is the order of ``fedmerge --help``.
COMMAND_MODULES = [
    "fedmerge.commands.data",
    "fedmerge.commands.import_weights",
    "fedmerge.commands.pretrain",
    "fedmerge.commands.adapt",
    "fedmerge.commands.merge",
    "fedmerge.commands.evaluate",
    "fedmerge.commands.simulate",
    "fedmerge.commands.compare",
    "fedmerge.commands.deploy",
]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description="One-shot, BN-aware federated merging of domain-adapted segmentation models, on Flower.",
        epilog=SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, ValueError, KeyError) as exc:
        if args.verbose:
            raise
        print(f"fedmerge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
