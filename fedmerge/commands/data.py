"""``fedmerge data``: write the synthetic domains to disk, and check a dataset end to end."""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from pathlib import Path

from common.data.spec import parse_size
from fedmerge.cli import CommandError


def synth(args: argparse.Namespace) -> int:
    from common.data.synthetic import DEFAULT_IMAGES_PER_DOMAIN, DEFAULT_SIZE, SYNTHETIC_STYLES, write_synthetic_folder

    args.images_per_domain = args.images_per_domain or DEFAULT_IMAGES_PER_DOMAIN
    args.size = args.size or DEFAULT_SIZE
    args.styles = args.styles or ",".join(SYNTHETIC_STYLES)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in SYNTHETIC_STYLES]
    if unknown:
        raise CommandError(f"unknown style {unknown[0]!r}; styles: {', '.join(SYNTHETIC_STYLES)}")
    if args.images_per_domain < 1:
        raise CommandError("--images-per-domain must be at least 1")
    _prepare_folder(Path(args.out), args.overwrite)
    start = time.perf_counter()
    dirs = write_synthetic_folder(args.out, styles, args.images_per_domain, args.seed, args.size)
    print(
        f"wrote {args.images_per_domain} images x {len(dirs)} styles ({args.size[0]}x{args.size[1]}, seed {args.seed}) "
        f"to {args.out} in {time.perf_counter() - start:.1f} s; read one back with folder:{args.out}?domain=STYLE"
    )
    return 0


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """An empty (or new) folder: files left from another run would mix into the dataset read from it."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CommandError(f"--out {out} is not empty; pass --overwrite to empty it first")
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check(args: argparse.Namespace) -> int:
    """Read every item once: labels are checked lazily, so this is how to find a bad file early."""
    import torch

    from common.data import DataSpec, build_dataset, dataset_classes

    spec = DataSpec.parse(args.data)
    names = dataset_classes(spec.kind, spec.root)
    dataset = build_dataset(spec)
    pixels = torch.zeros(256, dtype=torch.int64)
    domains: Counter[str] = Counter()
    shapes: Counter[tuple[int, ...]] = Counter()
    for i in range(len(dataset)):
        image, label = dataset[i]
        pixels += torch.bincount(label.flatten().clamp(0, 255), minlength=256)
        domains[dataset.domain_of(i) if hasattr(dataset, "domain_of") else spec.kind] += 1
        shapes[tuple(image.shape[-2:])] += 1
    total = int(pixels.sum())
    print(f"{spec}: {len(dataset)} images, all readable; sizes {dict(shapes)}")
    print("domains: " + ", ".join(f"{d} ({n})" for d, n in sorted(domains.items())))
    for cls, name in enumerate(names):
        print(f"  {cls:3d} {name:<16} {100 * int(pixels[cls]) / max(total, 1):6.2f} % of pixels")
    print(f"  255 {'ignore':<16} {100 * int(pixels[255]) / max(total, 1):6.2f} % of pixels")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the synthetic domains; check a dataset")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data_sub.add_parser("synth", help="write the synthetic styles in the folder layout")
    s.add_argument("--out", required=True, help="output directory (DIR/classes.txt, DIR/<style>/images|labels)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--images-per-domain", type=int, default=0, help="images per style (default: the generator's)")
    s.add_argument("--size", type=_size, default=None, metavar="HxW", help="default 96x128")
    s.add_argument("--styles", default="", help="comma list (default: all)")
    s.add_argument("--overwrite", action="store_true", help="empty a non-empty --out folder first")
    s.set_defaults(func=synth)
    c = data_sub.add_parser("check", help="read every image and label of a data spec; print class frequencies")
    c.add_argument("--data", required=True, metavar="SPEC", help="e.g. camvid:/data/camvid?split=all&domain=0016E5")
    c.set_defaults(func=check)
