"""``fedmerge merge``: the strategy's maths on checkpoints a user already holds."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from safetensors.torch import save_file

from common.merging import BUFFER_MODES, MergeAccumulator
from common.update_format import load_site_update
from common.validation import validate_update
from fedmerge.cli import CommandError

log = logging.getLogger(__name__)


def _weighting(text: str, n: int) -> tuple[str, list[float] | None]:
    if text in ("uniform", "counts"):
        return text, None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise CommandError(f"--weights must be uniform, counts or a comma list of numbers, not {text!r}") from exc
    if len(weights) != n:
        raise CommandError(f"--weights lists {len(weights)} numbers for {n} site updates")
    return "explicit", weights


def merge(args: argparse.Namespace) -> int:
    weighting, weights = _weighting(args.weights, len(args.sites))
    first, meta = load_site_update(args.sites[0])
    acc = MergeAccumulator(first.state_dict(), weighting, args.buffers)
    for i, path in enumerate(args.sites):
        update, _ = (first, meta) if i == 0 else load_site_update(path)
        validate_update(update, first.state_dict())
        acc.add(update, None if weights is None else weights[i])
        del update
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "fedmerge.format": "checkpoint/1",
        "arch": meta.get("arch", ""),
        "num_classes": meta.get("num_classes", ""),
        "merged_from": ",".join(acc.sites),
    }
    save_file({k: v.contiguous() for k, v in acc.result().items()}, str(out), metadata=metadata)
    print(f"merged {len(acc.sites)} sites ({', '.join(acc.sites)}) into {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge site-update files into one model, training-free")
    p.add_argument("sites", nargs="+", help="site updates (.safetensors site-update/1, or PyTorch state dicts)")
    p.add_argument("--out", required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--weights", default="uniform", help="uniform | counts | a comma list, one weight per site")
    p.add_argument("--buffers", default="gaussian", choices=BUFFER_MODES, help="how BN statistics merge")
    p.set_defaults(func=merge)
