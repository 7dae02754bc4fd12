"""What the field's networks cost on this CPU: a training step of each, HRDA on DAFormer, the merge at MiT-B5 size.

* per architecture (19 classes, random init, nothing downloaded): parameters; one forward
  + backward step (cross-entropy on random labels, batch 2 at 128x128, train mode), the
  median of ``--repeats`` after one warm-up step; the step's peak memory over the built
  model (the kernel's RSS high-water mark, reset before the step: activations and
  gradients), with ``benchmarks/merge_bench.py``'s RSS helpers;
* HRDA: ``benchmarks/hrda_cost.py``'s two measurements on synthetic images at 128x128,
  batch 2: a plain step (forward, backward, AdamW) of ``daformer_b5`` against the whole
  ``hrda`` method step on ``hrda_daformer_b5``, the latter from the difference of a 4-
  and a 2-step run so that build and start-up costs cancel;
* the server's streaming merge of K ``daformer_b5`` site updates (MiT-B5 size), float64
  sums, recalibration round and file included: ``benchmarks/merge_bench.py``'s worker
  (one fresh process per K) with its floor (NumPy summing K model-sized float32 arrays,
  the memory-bandwidth floor) and its tables.

    .venv/bin/python benchmarks/field_nets_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import hrda_cost  # noqa: E402
import merge_bench  # noqa: E402

from common.models.catalog import ARCHITECTURES  # noqa: E402
from common.models.factory import build_model  # noqa: E402

ARCHS = [*(a for a in ARCHITECTURES if a.startswith("segformer_")), "daformer_b5", "deeplabv2_resnet101"]
CLASSES = 19
MB = 1024 * 1024
SYNTHETIC = "synthetic:?domain={domain}&n=4&size=128x128&seed=0"
SYNTHETIC_CLASSES = 9


def step_cost(arch: str, batch: int, side: int, repeats: int) -> dict[str, float]:
    """Parameters, median seconds of one forward + backward, and that step's peak memory over the model."""
    torch.manual_seed(0)
    model = build_model(arch, CLASSES).train()
    images = torch.rand(batch, 3, side, side)
    labels = torch.randint(CLASSES, (batch, side, side))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    baseline = merge_bench.reset_peak_rss(collect=True)
    step()
    peak = merge_bench.peak_rss() - baseline
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "seconds": statistics.median(times), "peak": peak}


def hrda_against_plain(repeats: int) -> tuple[float, float]:
    """(plain step s, hrda step s) of daformer_b5 on 128x128 synthetic images, batch 2."""
    source, target = SYNTHETIC.format(domain="source"), SYNTHETIC.format(domain="fog")
    plain = hrda_cost.plain_step_seconds("daformer_b5", repeats, source, SYNTHETIC_CLASSES)
    runs = [hrda_cost.hrda_seconds("daformer_b5", n, {}, source, target, SYNTHETIC_CLASSES) for n in (2, 4)]
    return plain, (runs[1] - runs[0]) / 2


def merge_rows(sites: list[int], threads: int) -> list[dict]:
    worker = ["--worker", "stream", "--precision", "float64", "--threads", str(threads), "--arch", "daformer_b5"]
    return [merge_bench.run_worker([*worker, "--k", str(k)]) for k in sites]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sites", default="2,4", help="K values for the merge at MiT-B5 size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s); steps: batch 2 at 128x128, {CLASSES} classes\n")
    print("| arch | parameters (M) | forward + backward s | step peak over the model, MB |")
    print("|---|---|---|---|")
    for arch in ARCHS:
        cost = step_cost(arch, 2, 128, args.repeats)
        print(f"| {arch} | {cost['params'] / 1e6:.2f} | {cost['seconds']:.3f} | {cost['peak'] / MB:.0f} |", flush=True)
    plain, hrda = hrda_against_plain(args.repeats)
    print("\n| daformer_b5, batch 2 at 128x128 | plain step s | hrda step s | hrda / plain |")
    print("|---|---|---|---|")
    print(f"| synthetic images | {plain:.2f} | {hrda:.2f} | {hrda / plain:.1f}x |", flush=True)
    rows = merge_rows([int(k) for k in args.sites.split(",")], args.threads)
    print(f"\nmerge of daformer_b5 site updates, {rows[0]['model_bytes'] / MB:.1f} MB each\n")
    print(merge_bench.time_table(rows))
    print()
    print(merge_bench.memory_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
