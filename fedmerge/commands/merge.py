"""``fedmerge merge``: the strategy's maths on checkpoints a user already holds."""

from __future__ import annotations

import argparse
import logging

from common.checkpoints import save_state
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
    arch, num_classes = args.arch or meta.get("arch", ""), args.num_classes or int(meta.get("num_classes") or 0)
    if not arch or num_classes < 1:
        raise CommandError(f"{args.sites[0]} does not say which model it is: pass --arch and --num-classes")
    acc = MergeAccumulator(first.state_dict(), weighting, args.buffers)
    for i, path in enumerate(args.sites):
        update, _ = (first, meta) if i == 0 else load_site_update(path)
        validate_update(update, first.state_dict())
        acc.add(update, None if weights is None else weights[i])
        del update
    out = save_state(acc.result(), args.out, arch, num_classes, {"merged_from": ",".join(acc.sites)})
    print(f"merged {len(acc.sites)} sites ({', '.join(acc.sites)}) into {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge site-update files into one model, training-free")
    p.add_argument("sites", nargs="+", help="site updates (.safetensors site-update/1, or PyTorch state dicts)")
    p.add_argument("--out", required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--weights", default="uniform", help="uniform | counts | a comma list, one weight per site")
    p.add_argument("--buffers", default="gaussian", choices=BUFFER_MODES, help="how BN statistics merge")
    p.add_argument("--arch", default="", help="the model, for site updates that do not record it (plain .pt)")
    p.add_argument("--num-classes", type=int, default=0, help="with --arch")
    p.set_defaults(func=merge)
