"""How much each corruption costs a source model on CamVid's target sequences: the table behind camvid-c.

For every target sequence, the checkpoint is scored on all of its frames here, clean and under each
corruption, and the drop is printed in mIoU points; camvid-c keeps corruptions that cost the source at
least 8 points on their target. The frames scored are the developer frames of each sequence: the
drop is a property of the corruption on the domain, the later held-out frames will shift it a little.

    .venv/bin/python benchmarks/camvid_corruptions.py --checkpoint SOURCE.safetensors \\
        --corruptions fog:3,fog:5,night:3,night:5,snow:3,motion_blur:4,gaussian_noise:3,contrast:4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.data import DataSpec, build_dataset, make_loader  # noqa: E402
from common.models.checkpoints import load_checkpoint  # noqa: E402
from common.scoring.evaluation import evaluate_domain  # noqa: E402

SEQUENCES = {"dusk": "0001TP", "day": "Seq05VD", "day-b": "0006R0"}


def score(model: torch.nn.Module, spec: DataSpec, num_classes: int, batch_size: int) -> float:
    return 100 * evaluate_domain(model, make_loader(build_dataset(spec), batch_size), num_classes).miou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--corruptions", required=True, help="NAME:SEVERITY,... as the data-spec key takes them")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    num_classes = int(meta["num_classes"])
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    print(f"source-only mIoU (%) of {Path(args.checkpoint).name}, every frame of each sequence here")
    print("| target | sequence | clean | " + " | ".join(corruptions) + " |")
    print("|---|---|---:|" + "---:|" * len(corruptions))
    for name, sequence in SEQUENCES.items():
        clean = DataSpec.parse(f"camvid:{args.data_root}?split=all&domain={sequence}")
        base = score(model, clean, num_classes, args.batch_size)
        cells = []
        for corruption in corruptions:
            value = score(model, DataSpec.parse(f"{clean}&corruption={corruption}"), num_classes, args.batch_size)
            cells.append(f"{value:.1f} ({value - base:+.1f})")
        print(f"| {name} | {sequence} | {base:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
