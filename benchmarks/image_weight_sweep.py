"""Which prediction-time image weight (``bn-image-weight``) suits a shipped config, over its protocol's runs.

Each test image is normalised with (1-w)·stored + w·its own BN statistics. This reruns a config's
protocol with just source-only, the single sites and the default merge at several weights (with the
protocol's cache, the sites are read back, so only merging and scoring run) and prints each weight's
H against the best single site and source-only, run by run.

    .venv/bin/python benchmarks/image_weight_sweep.py --config camvid-c --out-dir runs/iw/camvid-c \
        --cache-dir runs/camvid-cache --threads 1
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from protocol_targets import load_runs, target_table  # this folder's script, beside this one

from experiments.shipped import resolve_config_path
from fedmerge.cli import main as fedmerge

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def sweep_config(shipped: Path, weights: tuple[float, ...]) -> str:
    """The shipped config's text with its strategy list replaced by the sweep's rows."""
    rows = "".join(f'    {{ name = "merge", label = "merge w={w}", image-weight = {w} }},\n' for w in weights)
    text, count = re.subn(r"(?ms)^strategies = \[.*?^\]\n", f'strategies = [\n    "source-only", "single",\n{rows}]\n',
                          shipped.read_text())  # fmt: skip
    if count != 1:
        raise SystemExit(f"{shipped}: expected one strategies list, found {count}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a shipped config with a [protocol], e.g. camvid-c")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", required=True, help="the protocol's cache (its sites are reused)")
    parser.add_argument("--data-root", default="../shared/data/camvid", help="for the CamVid configs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    config = args.out_dir / f"{args.config}-image-weight.toml"
    config.write_text(sweep_config(resolve_config_path(args.config), WEIGHTS))
    # --no-record-command: compare would record this script's argv as its own command
    status = fedmerge(["compare", "--config", str(config), "--out-dir", str(args.out_dir), "--data-root",
                       args.data_root, "--cache-dir", args.cache_dir, "--threads", str(args.threads),
                       "--no-record-command"])  # fmt: skip
    if status:
        raise SystemExit(status)
    print(target_table(load_runs(args.out_dir), [f"merge w={w}" for w in WEIGHTS]))


if __name__ == "__main__":
    main()
