"""``fedmerge merge``: the ServerApp's merge, by the same engine and spec, on files a user already holds."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

from fedmerge.cli import CommandError

log = logging.getLogger(__name__)


def _weights(text: str, n: int) -> tuple[str, list[float] | None]:
    if text in ("uniform", "counts"):
        return text, None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise CommandError(f"--weights must be uniform, counts or a comma list of numbers, not {text!r}") from exc
    if len(weights) != n:
        raise CommandError(f"--weights lists {len(weights)} numbers for {n} site updates")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or max(weights) == 0:
        raise CommandError(f"--weights must be finite and >= 0, and not all 0; got {text!r}")
    return "explicit", [w / max(weights) for w in weights]  # a weighted mean does not change with the scale


def _check_out(out: str, inputs: list[str]) -> Path:
    path = Path(out)
    if path.is_dir():
        raise CommandError(f"--out {out} is a directory; give a file name ending in .safetensors")
    if path.suffix != ".safetensors":
        raise CommandError(f"--out {out}: the merged model is written as safetensors; end the name in .safetensors")
    resolved = path.resolve()
    if any(Path(p).resolve() == resolved for p in inputs):
        raise CommandError(f"--out {out} is one of the inputs; it would be overwritten")
    return path


def merge(args: argparse.Namespace) -> int:
    from common.config.run import RunConfig, bank_source
    from common.merge.engine import MergeEngine, Refused
    from common.models.checkpoints import read_model_file
    from common.updates.files import load_site_update

    inputs = [*([args.base] if args.base else []), *args.sites]
    out = _check_out(args.out, inputs)
    weighting, weights = _weights(args.weights, len(args.sites))
    chosen = {"merge-method": args.method, "merge-options": " ".join(args.option) or None,
              "bn-image-weight": args.bn_image_weight}  # fmt: skip
    defaults = RunConfig.read({k: v for k, v in chosen.items() if v is not None})
    spec = dataclasses.replace(
        defaults.merge_spec(), weighting=weighting, buffers=args.buffers or defaults.buffer_mode,
        equal_site_stats=args.equal_site_stats or defaults.equal_site_stats,
        max_share=args.max_site_share if args.max_site_share is not None else defaults.max_site_share,
        clip_norm=args.clip_norm if args.clip_norm is not None else defaults.clip_norm,
    )  # fmt: skip
    first, meta = load_site_update(args.sites[0])
    arch, num_classes = args.arch or meta.get("arch", ""), args.num_classes or int(meta.get("num_classes") or 0)
    if not arch or num_classes < 1:
        raise CommandError(f"{args.sites[0]} does not say which model it is: pass --arch and --num-classes")
    if spec.needs_base and not args.base:
        raise CommandError(
            f"merge method {spec.method!r} (or --clip-norm) needs the shared starting model: --base FILE"
        )
    template = read_model_file(args.base).state if args.base else first.state_dict()
    engine = MergeEngine(spec, template)
    if weighting != "uniform" and spec.max_share < 1.0:
        engine.expect_weights(weights or [float(load_site_update(p)[0].num_examples) for p in args.sites])
    for i, path in enumerate(args.sites):
        if weights is not None and weights[i] == 0:
            print(f"{path}: weight 0, left out")
            continue
        update = first if i == 0 else load_site_update(path)[0]
        outcome = engine.ingest(update, None if weights is None else weights[i])
        if isinstance(outcome, Refused):
            raise CommandError(f"{path}: {outcome.reason}")
        del update
    weight = defaults.bn_image_weight
    source = bank_source("own" if args.bn_bank else "", weight)
    written = engine.save(out, arch, num_classes, bank=engine.bank(source, weight) if source else None)
    print(f"merged {len(engine.sites)} sites ({', '.join(engine.sites)}) with {spec.method} into {written}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from common.merge.spec import BUFFER_MODES, MERGE_METHODS

    p = sub.add_parser("merge", help="merge site-update files into one model, training-free")
    p.add_argument("sites", nargs="+", help="site updates (.safetensors site-update/1, or PyTorch state dicts)")
    p.add_argument("--out", required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--method", choices=MERGE_METHODS.names(), help="the merge method (default: the run config's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a merge-method option")
    p.add_argument("--base", help="the shared starting model (task-arithmetic, ties, --clip-norm)")
    p.add_argument("--weights", default="uniform", help="uniform | counts | a comma list, one weight per site")
    p.add_argument("--buffers", choices=BUFFER_MODES, help="how BN statistics merge (default: the run config's)")
    p.add_argument("--equal-site-stats", action="store_true", help="pool BN statistics with equal site weights")
    p.add_argument("--max-site-share", type=float, help="cap on one site's share of the weight (0, 1]")
    p.add_argument("--clip-norm", type=float, help="L2 bound on a site's parameter change from --base")
    p.add_argument("--bn-bank", action="store_true", help="ship every site's BN statistics; each image picks one")
    p.add_argument("--bn-image-weight", type=float, metavar="W",
                   help="each test image's share of its own BN statistics, in [0, 1] "
                        "(0: off; default: the run config's)")  # fmt: skip
    p.add_argument("--arch", default="", help="the model, for site updates that do not record it (plain .pt)")
    p.add_argument("--num-classes", type=int, default=0, help="with --arch")
    p.set_defaults(func=merge)
