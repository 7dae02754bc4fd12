"""Source-only mIoU of CamVid source-model recipes, judged on time folds of every target.

Each recipe trains a model on the labeled day sequence 0016E5 (all 305 frames), the way
``pretrain_to_file`` does, and scores it as is on the target sequences. The source model never
sees a target frame, so every target frame is fair to score on; to tune for the domain and not for
a few frames, each target is cut by time into thirds (first / middle / last) and scored per third:

- dusk: 0001TP (62 frames), day: Seq05VD (110 frames), day-b: 0006R0 (70 frames).

Columns: mIoU per third, the mean of the thirds per target, ``H folds`` = the mean over the thirds
of H(dusk third, day third), ``H3 folds`` the same with day-b, and ``H repo`` = H(dusk, day) on the
repository's evaluation split (0001TP last 20, Seq05VD last 30). Every run is cached (checkpoint
plus JSON) under ``--cache-dir`` by recipe, seed, threads and a hash of its config, so the table can
be built up one training at a time and rebuilt without training.

    .venv/bin/python benchmarks/pretrain_camvid.py --threads 1 --recipes today,photo --seeds 0,1

One recipe at the shipped schedule is about 15-25 minutes of CPU with one thread.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from common.data import DataSpec, build_dataset, dataset_classes, make_loader
from common.data.transforms import PhotometricAugment
from common.models.checkpoints import load_checkpoint, save_checkpoint
from common.scoring.evaluation import evaluate_domain
from common.scoring.metrics import harmonic_mean
from common.training.pretrain import PretrainConfig, pretrain

ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid")  # ../shared beside the repo
SOURCE = "camvid:{root}?split=all&domain=0016E5"
TARGETS = {"dusk": "0001TP", "day": "Seq05VD", "day-b": "0006R0"}
REPO_SPLIT = {"dusk": "0001TP&time=last:20", "day": "Seq05VD&time=last:30"}
FOLDS = ("first", "middle", "last")
CLASSES = dataset_classes("camvid")

TODAY = PretrainConfig(steps=600, batch_size=8, progress=False)  # today's shipped source recipe
PHOTO = PhotometricAugment()
# name: changes to TODAY. Single options first, then schedules and architectures, then combinations.
RECIPES: dict[str, dict[str, object]] = {
    "today": {},
    "photo": {"photometric": PHOTO},
    "photo-dark": {"photometric": PhotometricAugment(brightness=(0.35, 1.3), gamma=(0.8, 1.8))},
    "cw0.5": {"class_weight_power": 0.5},
    "cw0.3": {"class_weight_power": 0.3},
    "ohem0.25": {"hard_pixel_fraction": 0.25},
    "ls0.1": {"label_smoothing": 0.1},
    "d5": {"arch": "small_unet_d5"},
    "crop-1200": {"steps": 1200, "crop": (128, 160)},
    "lr4e-3": {"lr": 4e-3},
    "photo+cw0.5": {"photometric": PHOTO, "class_weight_power": 0.5},
    "photo+cw0.5+crop": {"photometric": PHOTO, "class_weight_power": 0.5, "steps": 1200, "crop": (128, 160)},
    "photo+cw0.5+d5": {"photometric": PHOTO, "class_weight_power": 0.5, "arch": "small_unet_d5"},
    "photo+cw0.5+d5+crop": {
        "photometric": PHOTO,
        "class_weight_power": 0.5,
        "arch": "small_unet_d5",
        "steps": 1200,
        "crop": (128, 160),
    },
    "photo+cw0.5+d5+ls0.1": {
        "photometric": PHOTO,
        "class_weight_power": 0.5,
        "arch": "small_unet_d5",
        "label_smoothing": 0.1,
    },
    "photo+cw0.7+d5": {"photometric": PHOTO, "class_weight_power": 0.7, "arch": "small_unet_d5"},
}


def _config(recipe: str, seed: int) -> PretrainConfig:
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    return replace(TODAY, seed=seed, **RECIPES[recipe])  # type: ignore[arg-type]


def _run_name(recipe: str, config: PretrainConfig, threads: int) -> str:
    digest = hashlib.sha256(repr(replace(config, progress=False)).encode()).hexdigest()[:8]
    return f"{recipe}-s{config.seed}-t{threads}-{digest}"


def _in_memory(data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [data[i] for i in range(len(data))]  # type: ignore[arg-type]


def _thirds(n: int) -> list[range]:
    cuts = [round(n * i / 3) for i in range(4)]
    return [range(cuts[i], cuts[i + 1]) for i in range(3)]


def evaluation_sets(root: str) -> dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]:
    """``target/fold`` and ``repo/target`` sets, decoded once and kept in memory for every model."""
    sets: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, sequence in TARGETS.items():
        frames = _in_memory(build_dataset(DataSpec.parse(f"camvid:{root}?split=all&domain={sequence}")))
        for fold, window in zip(FOLDS, _thirds(len(frames)), strict=True):
            sets[f"{name}/{fold}"] = Subset(frames, window)  # type: ignore[arg-type]
    for name, selection in REPO_SPLIT.items():
        sets[f"repo/{name}"] = _in_memory(build_dataset(DataSpec.parse(f"camvid:{root}?split=all&domain={selection}")))
    return sets


def score(model: torch.nn.Module, sets: Mapping[str, Sequence]) -> dict[str, dict[str, object]]:
    """mIoU (%) and per-class IoU (%) of ``model`` on every evaluation set."""
    out = {}
    for name, data in sets.items():
        result = evaluate_domain(model, make_loader(data, 8), len(CLASSES))  # type: ignore[arg-type]
        out[name] = {"miou": 100 * result.miou, "per_class": [100 * v for v in result.per_class]}
    return out


def train_or_load(
    recipe: str, seed: int, args: argparse.Namespace, sets: Callable[[], Mapping[str, Sequence]]
) -> dict | None:
    """One run's record: from the cache when it is there, else trained, timed, scored and cached."""
    config = _config(recipe, seed)
    name = _run_name(recipe, config, args.threads)
    record_path = Path(args.cache_dir) / f"{name}.json"
    if record_path.is_file() and not args.retrain:
        return json.loads(record_path.read_text())
    if args.cached_only:
        return None
    spec = DataSpec.parse(SOURCE.format(root=args.root))
    print(f"training {name}: {config}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = pretrain(spec, config)
    seconds = time.perf_counter() - start
    path = save_checkpoint(model, Path(args.cache_dir) / f"{name}.safetensors", config.arch, CLASSES, {"recipe": name})
    model, _ = load_checkpoint(path)  # score what was written
    record = {
        "recipe": recipe,
        "seed": seed,
        "threads": args.threads,
        "seconds": seconds,
        "config": repr(config),
        "params": sum(p.numel() for p in model.parameters()),
        "scores": score(model, sets()),
    }
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{name}: {seconds:.0f} s, H repo {_h_repo(record):.1f}, H folds {_h_folds(record):.1f}", file=sys.stderr)
    return record


def _miou(record: dict, key: str) -> float:
    return float(record["scores"][key]["miou"])


def _h_repo(record: dict) -> float:
    return harmonic_mean({t: _miou(record, f"repo/{t}") for t in REPO_SPLIT})


def _h_folds(record: dict, targets: Sequence[str] = ("dusk", "day")) -> float:
    return statistics.mean(harmonic_mean({t: _miou(record, f"{t}/{f}") for t in targets}) for f in FOLDS)


def _fmt(values: Sequence[float], spec: str = ".1f") -> str:
    """Mean over seeds, with the range when there is more than one seed."""
    mean = format(statistics.mean(values), spec)
    return mean if len(values) == 1 else f"{mean} ({min(values):{spec}}..{max(values):{spec}})"


def _row(records: Sequence[dict]) -> list[str]:
    cells = [records[0]["recipe"], str(records[0]["threads"]), ",".join(str(r["seed"]) for r in records)]
    for target in TARGETS:
        cells += [f"{statistics.mean(_miou(r, f'{target}/{f}') for r in records):.1f}" for f in FOLDS]
        cells.append(_fmt([statistics.mean(_miou(r, f"{target}/{f}") for f in FOLDS) for r in records]))
    cells.append(_fmt([_h_repo(r) for r in records]))
    cells.append(_fmt([_h_folds(r) for r in records]))
    cells.append(_fmt([_h_folds(r, tuple(TARGETS)) for r in records]))
    cells.append(f"{records[0]['params'] / 1e6:.2f}")
    cells.append(_fmt([r["seconds"] for r in records], ".0f"))
    return cells


def _per_class_rows(records: Sequence[dict], key: str) -> list[str]:
    iou = [statistics.mean(r["scores"][key]["per_class"][c] for r in records) for c in range(len(CLASSES))]
    return [records[0]["recipe"], key, *("n/a" if math.isnan(v) else f"{v:.0f}" for v in iou)]


def table(groups: Sequence[Sequence[dict]]) -> str:
    """The markdown report: the fold table, then per-class IoU on the repository split."""
    head = ["recipe", "threads", "seeds"]
    for target in TARGETS:
        head += [f"{target} {f}" for f in FOLDS] + [f"**{target} mean**"]
    head += ["**H repo**", "**H folds**", "H3 folds", "M params", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    lines += ["| " + " | ".join(_row(g)) + " |" for g in groups]
    short = ["sky", "bldg", "pole", "road", "pave", "tree", "sign", "fence", "car", "ped", "bike"]
    lines += ["", "Per-class IoU (%) on the repository split, mean over seeds:", ""]
    lines += ["| recipe | set | " + " | ".join(short) + " |", "|---|---|" + "---:|" * len(short)]
    for group in groups:
        for key in (f"repo/{t}" for t in REPO_SPLIT):
            lines.append("| " + " | ".join(_per_class_rows(group, key)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="today", help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0", help="comma list of pretraining seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for training and scoring")
    parser.add_argument("--root", default=ROOT)
    parser.add_argument("--cache-dir", default="runs/pretrain_camvid", help="checkpoints and per-run records")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached record exists")
    parser.add_argument("--cached-only", action="store_true", help="never train: report the cached runs only")
    parser.add_argument("--out", default="", help="write the markdown table here (it is always printed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.root).is_dir():
        parser.error(f"no CamVid at {args.root} (--root)")
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = functools.cache(lambda: evaluation_sets(args.root))  # decoded only if a recipe must be trained
    runs = [[train_or_load(recipe, seed, args, sets) for seed in seeds] for recipe in recipes]
    groups = [[r for r in group if r is not None] for group in runs]
    groups = [g for g in groups if g]
    report = table(groups)
    print(report)
    if args.out:
        command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"Command (from the repository root):\n\n```\n{command}\n```\n\n{report}")


if __name__ == "__main__":
    main()
