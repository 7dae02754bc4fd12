"""Every adaptation method on CamVid: a day source (0016E5) adapted to dusk and to another day route.

Targets (split by time = sorted frame name; the evaluation frames are never adapted on):

- dusk: 0001TP (62 frames in train): adapt on the first 42, evaluate on the last 20;
- day:  Seq05VD (110 frames in test): adapt on the first 80, evaluate on the last 30.

For tuning without touching those evaluation frames there are three more targets:
- dusk-tune: 0001TP's first 42 frames only (the adaptation frames): adapt on the first 30,
  score on frames 31-42, so the dusk domain can be tuned on without its last 20 frames;
- day-b: 0006R0 (70 frames in train): adapt on the first 50, evaluate on the last 20;
- dark-day-b: the same frames at 0.45 x brightness, a stand-in for dusk whose labels
  we may look at as often as we like.

The source model is small_unet pretrained on 0016E5 (``--source-model``; pretrained on first
use with the recipe of benchmarks/results/camvid_source.md when the file is missing). hrda
runs on hrda_small_unet (the source model wrapped, fresh attention head) with the 0016E5
train frames as its labeled source set. Every method goes through adapt_site: the method,
then the exact BN statistics pass on the target frames it adapted on.

    .venv/bin/python benchmarks/adaptation_camvid.py --threads 2      # the table, ~2 h on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adaptation_runner import Target, add_common_arguments, run_all  # benchmarks/, beside this file
from torch.utils.data import Dataset, Subset

from common.data import DataSpec, TimeSplit, build_dataset, dataset_classes
from common.training.pretrain import PretrainPlan, pretrain_to_file

ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid")  # ../shared beside the repo
SOURCE_MODEL = "runs/adapt_camvid/source.safetensors"
METHODS = ("source-only", "adabn", "tent", "selftrain", "sfda", "hrda")
SPLITS = {  # name: (split, sequence, adaptation frames, evaluation frames, brightness)
    "dusk": ("train", "0001TP", "first:42", "last:20", 1.0),
    "day": ("test", "Seq05VD", "first:80", "last:30", 1.0),
    "dusk-tune": ("train", "0001TP", "first:30", "first:42", 1.0),  # scored on frames 31-42 only
    "day-b": ("train", "0006R0", "first:50", "last:20", 1.0),
    "dark-day-b": ("train", "0006R0", "first:50", "last:20", 0.45),
}


class Dimmed(Dataset):
    """Images scaled in brightness, labels unchanged: a synthetic dusk with real scenes."""

    def __init__(self, base: Dataset, factor: float) -> None:
        self.base, self.factor = base, factor

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[idx]
        return (image * self.factor).clamp(0.0, 1.0), label


def camvid_target(name: str, root: str) -> Target:
    split, sequence, adapt, evaluate, brightness = SPLITS[name]

    def build(time_split: str) -> Dataset:
        data = build_dataset(DataSpec.parse(f"camvid:{root}?split={split}&domain={sequence}&time={time_split}"))
        return data if brightness == 1.0 else Dimmed(data, brightness)

    if name == "dusk-tune":  # the frames after the adaptation ones, inside first:42
        window = build(evaluate)
        cut = TimeSplit.parse(adapt).num_frames(len(window))
        return Target(name, build(adapt), Subset(window, range(cut, len(window))))
    return Target(name, build(adapt), build(evaluate))


def source_checkpoint(path: Path, root: str, steps: int) -> Path:
    """The source model: pretrained on 0016E5 (train + val) on first use, then cached."""
    if path.is_file():
        return path
    plan = PretrainPlan(DataSpec.parse(f"camvid:{root}?split=all&domain=0016E5"), steps=steps)
    return pretrain_to_file(plan, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-model", default=SOURCE_MODEL, help="small_unet checkpoint pretrained on 0016E5")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="when the source model is made here")
    parser.add_argument("--root", default=ROOT)
    parser.add_argument("--targets", default="dusk,day", help=f"comma list of {', '.join(SPLITS)}")
    add_common_arguments(parser, METHODS, "runs/adapt_camvid/results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.root).is_dir():
        parser.error(f"no CamVid at {args.root} (--root)")
    checkpoint = str(source_checkpoint(Path(args.source_model), args.root, args.pretrain_steps))
    source = build_dataset(DataSpec.parse(f"camvid:{args.root}?split=train&domain=0016E5"))
    targets = [camvid_target(name, args.root) for name in args.targets.split(",")]
    run_all(args, checkpoint, len(dataset_classes("camvid")), targets, source)


if __name__ == "__main__":
    main()
