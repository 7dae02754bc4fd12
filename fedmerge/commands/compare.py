"""``fedmerge compare``: every merging strategy on the same site updates, scored on the same data."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from experiments.tables import markdown_table
from fedmerge.cli import CommandError, add_device_options


def _run_once(config, out_dir: Path, cache_dir: Path, command: str) -> dict:
    """One comparison: run it, write results.{json,csv,md} and the plots, print its table."""
    from experiments.compare import run_compare
    from experiments.plots import write_plots
    from experiments.report import results_dict, write_results

    result = run_compare(config, cache_dir)
    plots = write_plots(result, out_dir)
    paths = write_results(result, out_dir, command, plots)
    domains = [e.domain for e in config.eval_sets]
    rows = [[r.label, *[f"{100 * r.per_domain[d]:.1f}" for d in domains], f"{100 * r.harmonic_mean:.1f}"]
            for r in result.rows]  # fmt: skip
    print(markdown_table([f"{config.name} (mIoU %)", *domains, "H"], rows))
    print(
        f"\n{result.wall_seconds:.0f} s; wrote {', '.join(p.name for p in paths)} and {', '.join(plots)} to {out_dir}"
    )
    return results_dict(result, command)


def _run_protocol(config, out_dir: Path, cache_dir: Path, command: str, finished_only: bool) -> None:
    import json

    from experiments.protocol import aggregate, protocol_markdown, run_protocol

    missing: list[str] | None = [] if finished_only else None
    runs = run_protocol(config, out_dir, cache_dir, lambda c, d, cache: _run_once(c, d, cache, command),
                        missing=missing)  # fmt: skip
    if not runs:
        raise CommandError(f"no finished run in {out_dir}; still to run: {', '.join(missing or [])}")
    (out_dir / "protocol.json").write_text(json.dumps({"runs": [r["experiment"] for r in runs],
                                                       "strategies": aggregate(runs)}, indent=2) + "\n")  # fmt: skip
    text = protocol_markdown(config, runs, command, missing)
    (out_dir / "protocol.md").write_text(text)
    print("\n" + text)


def compare(args: argparse.Namespace) -> int:
    from common.device.runtime import resolve_compute
    from common.device.spec import Compute
    from experiments.config import ExperimentConfig
    from experiments.shipped import resolve_config_path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the Flower processes of fedavg-rounds inherit it
    out_dir = Path(args.out_dir).resolve()
    config = ExperimentConfig.load(resolve_config_path(args.config), args.data_root)
    config = replace(config, compute=Compute(args.device or config.compute.device, args.amp or config.compute.amp))
    resolve_compute(config.compute)  # a device this machine lacks: one line, before any work
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else out_dir / "cache"
    command = "fedmerge " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.record_command else ""
    if config.protocol is not None and not args.single_run:
        _run_protocol(config, out_dir, cache_dir, command, args.finished_only)
    else:
        _run_once(config, out_dir, cache_dir, command)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from experiments.shipped import list_configs

    p = sub.add_parser("compare", help="compare merging strategies on the same cached site updates")
    p.add_argument("--config", required=True, help=f"a TOML file or a shipped name: {', '.join(list_configs())}")
    p.add_argument("--out-dir", required=True, help="where results.{json,csv,md} and the plots go")
    p.add_argument("--data-root", help="fills {data_root} in the config's data specs (e.g. the CamVid folder)")
    p.add_argument("--cache-dir", help="where site updates are cached (default: OUT_DIR/cache)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_device_options(p, default=None)
    p.add_argument("--single-run", action="store_true",
                   help="one comparison on the config's own splits, even when it declares a [protocol]")  # fmt: skip
    p.add_argument("--finished-only", action="store_true",
                   help="compute nothing: report the protocol runs already finished in OUT_DIR")  # fmt: skip
    p.add_argument("--no-record-command", dest="record_command", action="store_false",
                   help="leave the command line out of results.md")  # fmt: skip
    p.set_defaults(func=compare)
