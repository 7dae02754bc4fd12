"""``fedmerge simulate`` and ``fedmerge demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.tables import report_table
from fedmerge.cli import CommandError, add_device_options
from server.simulation import SimulationFailed, SimulationPlan, list_presets, run_simulation

DEMO_PRESET = "synthetic-3"


def _plan(args: argparse.Namespace) -> SimulationPlan:
    if args.config:
        return SimulationPlan.load(Path(args.config))
    return SimulationPlan.preset(args.preset)


def _overrides(items: list[str]) -> dict[str, object]:
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not key=value")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def simulate(args: argparse.Namespace) -> int:
    echo = None if args.quiet else sys.stderr
    plan = _plan(args)
    given = {"device": args.device, "amp": args.amp}  # the run-config keys, when given as flags
    overrides = {**_overrides(args.set), **{k: v for k, v in given.items() if v is not None}}
    try:  # every key and value is checked before anything starts
        report = run_simulation(plan, Path(args.out_dir), overrides, echo=echo, pretrain=args.pretrain)
    except SimulationFailed as exc:
        raise CommandError(str(exc)) from None
    print(report_table(report))
    clock = report["driver"]
    print(f"\n{len(report['sites'])} sites merged in {clock['stopped-at'] - clock['started-at']:.0f} s "
          f"(Flower's SuperLink up after {clock['superlink-ready-at'] - clock['started-at']:.0f} s)")  # fmt: skip
    print(f"merged model: {Path(args.out_dir).resolve() / 'merged.safetensors'}")
    return 0


def demo(args: argparse.Namespace) -> int:
    args.preset, args.config = DEMO_PRESET, None
    return simulate(args)


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    parser.add_argument("--quiet", action="store_true", help="do not echo Flower's log while the run goes")
    parser.add_argument(
        "--pretrain", action="store_true", help="train the starting model by the plan's [pretrain] recipe instead"
    )
    add_device_options(parser, default=None)  # the run-config keys device and amp; --set num-gpus=X for Ray


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run N sites in Flower's simulation engine and merge once")
    p.add_argument("--out-dir", required=True, help="where merged.safetensors and report.json go")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=DEMO_PRESET, help=f"one of: {', '.join(list_presets())}")
    src.add_argument("--config", help="a simulation TOML file (see server/presets/)")
    _run_options(p)
    p.set_defaults(func=simulate)

    d = sub.add_parser("demo", help=f"simulate the embedded synthetic default ({DEMO_PRESET}) and print the table")
    d.add_argument("--out-dir", default="runs/demo")
    _run_options(d)
    d.set_defaults(func=demo)
