"""The ``fedmerge`` command line: a thin dispatcher over one module per sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.data.spec import SPEC_HELP
from common.device.spec import AMP_MODES, DEVICE_CHOICES, Compute, DeviceError, check_device

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


def _device(text: str) -> str:
    try:
        return check_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_options(parser: argparse.ArgumentParser, default: str | None = "cpu", amp: bool = True) -> None:
    """``--device`` (and ``--amp``) the same way on every command that runs a model.

    ``default=None`` leaves both unset, for a command whose config file names them.
    """
    shown = "the config's" if default is None else default
    parser.add_argument("--device", type=_device, default=default,
                        help=f"where the model runs: {DEVICE_CHOICES} (auto: CUDA when present, else the CPU; "
                             f"default {shown})")  # fmt: skip
    if amp:
        amp_default = None if default is None else "off"
        parser.add_argument(
            "--amp",
            choices=AMP_MODES,
            default=amp_default,
            help=f"autocast precision of training and evaluation (default {amp_default or shown})",
        )


def device_options(args: argparse.Namespace) -> Compute:
    """The command's device as this machine runs it: a device it lacks is one line and exit 2, before any work."""
    from common.device.runtime import resolve_compute

    return resolve_compute(Compute(args.device or "cpu", getattr(args, "amp", None) or "off"))


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
