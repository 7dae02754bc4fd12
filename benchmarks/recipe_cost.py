"""What the shipped GPU recipes should cost on one GPU: measured here where it can be, counted where not, estimated.

For each recipe (``experiments/configs/cityscapes-idd-hrda-{daformer,deeplabv2}.toml``), read from
its own file (steps, window, batch, BN refresh, sizes, strategies):

1. **Counted at the recipe's size** (exact for this code, no GPU and no computation: the model
   runs on torch's ``meta`` device under ``FlopCounterMode``): the FLOPs of one ``hrda`` step
   (two training passes, forward and backward, of ``train_forward`` on a batch of windows;
   the teacher's sliding-window labelling of the target batch; the frozen ImageNet reference
   of the feature distance), of one inference image at each target's size (the site's
   statistics passes and the evaluation), split into convolutions and matrix products; and
   the bytes of every tensor one training pass saves for its backward (parameters excluded).
2. **Measured on this CPU** (one thread, ``torch.set_num_threads``): one whole ``hrda`` method
   step at a small window (``--side``), from the difference of a 3- and a 1-step run (build
   and start-up cancel, as in ``benchmarks/field_nets_cost.py``), and the FLOPs of that same
   step counted on the CPU, so the CPU's achieved rate shows whether FLOPs account for the
   time; the bf16 / fp32 ratio of the bytes saved for backward, measured under CPU autocast;
   and the seconds to read one full-size frame of each dataset through the project's readers
   (PNG decode, label mapping, resize), on frames built at the datasets' sizes: the loader is
   single-process, so a step waits for its four frames.
3. **Estimated for one H100 SXM**: FLOPs / (utilisation x peak), at utilisations of 0.2 and
   0.4 of NVIDIA's datasheet peaks (dense BF16 989.4, TF32 494.7, FP32 66.9 TFLOP/s): the
   training steps and the evaluation run under bf16 autocast; the statistics passes run
   without autocast, convolutions at the TF32 peak (cuDNN's default), matrix products at the
   FP32 peak (torch's default ``highest`` matmul precision). The frame reading measured
   here is added: a step reads 2 GTA5 and 2 target frames, every statistics pass all of a
   site's frames, the evaluation its frames once (they are then held in memory). The
   utilisations are an assumption, not a measurement. The GPU memory of a training step is
   the fixed part (student, teacher, reference, gradients, two AdamW moments in float32,
   and under autocast the weights' bf16 copies) plus one training pass's saved
   activations, scaled by the bf16 / fp32 ratio measured here; the allocator's slack, the
   CUDA context and cuDNN's workspaces are not in it.

    .venv/bin/python benchmarks/recipe_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.adaptation import METHODS, AdaptContext  # noqa: E402
from common.data import DataSpec, build_dataset, render  # noqa: E402
from common.models.factory import build_model  # noqa: E402
from common.models.multires import MultiResSegmenter, random_box  # noqa: E402
from experiments.config import CONFIGS_DIR, ExperimentConfig  # noqa: E402

RECIPES = {"cityscapes-idd-hrda-daformer": "daformer_b5", "cityscapes-idd-hrda-deeplabv2": "deeplabv2_resnet101"}
CLASSES = 19
# Frames per split (the datasets' own counts): what the statistics passes and the evaluation read.
FRAMES = {"cityscapes": {"train": 2975, "val": 500}, "idd": {"train": 6993, "val": 981}}
PEAK = {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}  # H100 SXM, dense, NVIDIA's datasheet
UTILISATION = (0.2, 0.4)
CONV_OPS = ("convolution",)
GB = 2**30
LAYOUT = {  # one frame where each reader looks for it: image, label, and the label value of the road class
    "gta5": ("images/00001.png", "labels/00001.png", 7),
    "cityscapes": ("leftImg8bit/train/aachen/aachen_000000_000000_leftImg8bit.png",
                   "gtFine/train/aachen/aachen_000000_000000_gtFine_labelIds.png", 7),
    "idd": ("leftImg8bit/train/201/frame0000_leftImg8bit.png",
            "gtFine/train/201/frame0000_gtFine_labellevel3Ids.png", 0),
}  # fmt: skip


@dataclass(frozen=True)
class Flops:
    conv: float
    matmul: float  # every other counted op: mm, addmm, bmm, attention

    @property
    def total(self) -> float:
        return self.conv + self.matmul

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.conv + other.conv, self.matmul + other.matmul)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.conv * k, self.matmul * k)


def _flops(counter: FlopCounterMode) -> Flops:
    ops = counter.get_flop_counts().get("Global", {})
    conv = sum(v for op, v in ops.items() if any(name in str(op) for name in CONV_OPS))
    return Flops(float(conv), float(sum(ops.values()) - conv))


class SavedBytes:
    """Bytes of the tensors autograd saves for backward: activations, and apart the weights autocast cast once.

    Parameters themselves are not counted (they are in the fixed memory); a weight's bf16 copy is
    counted once in ``casts`` (autocast caches it for the region), so that ``activations`` is what
    grows with the image.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.activations = self.casts = 0
        self._shapes = {tuple(p.shape) for p in model.parameters()}
        self._seen: set[int] = set()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        if tensor.is_leaf and tensor.requires_grad:
            return tensor
        if type(tensor.grad_fn).__name__ == "ToCopyBackward0" and tuple(tensor.shape) in self._shapes:
            if id(tensor) not in self._seen:
                self._seen.add(id(tensor))
                self.casts += size
            return tensor
        self.activations += size
        return tensor

    def __enter__(self) -> SavedBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


def train_pass(
    model: MultiResSegmenter, batch: int, side: int, device: str, amp: str = "off"
) -> tuple[Flops, SavedBytes]:
    """One ``train_forward`` pass with HRDA's two losses, forward and backward: its FLOPs and what it saved."""
    images = torch.rand(batch, 3, side, side, device=device)
    labels = torch.randint(CLASSES, (batch, side, side), device=device)
    box = random_box(side, side, model.config, torch.Generator(device="cpu").manual_seed(0))
    rows, cols = box.slices()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    with FlopCounterMode(display=False) as counter, SavedBytes(model) as saved:
        with cast:
            fused, detail = model.train_forward(images, box)
            loss = F.cross_entropy(fused, labels) + 0.1 * F.cross_entropy(detail, labels[:, rows, cols])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return _flops(counter), saved


@torch.no_grad()
def inference(model: torch.nn.Module, batch: int, height: int, width: int, device: str) -> Flops:
    """One eval-mode forward (an ``hrda_`` model: context and sliding detail windows)."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.rand(batch, 3, height, width, device=device))
    return _flops(counter)


@torch.no_grad()
def reference_features(model: MultiResSegmenter, batch: int, side: int, device: str) -> Flops:
    """The frozen ImageNet reference of the feature distance, on the source windows at the context scale."""
    small = round(side * model.config.context_scale)
    with FlopCounterMode(display=False) as counter:
        model.features(torch.rand(batch, 3, small, small, device=device))
    return _flops(counter)


def step_flops(model: MultiResSegmenter, batch: int, side: int, device: str, fd: bool) -> Flops:
    """Source pass + mixed pass (forward and backward), the teacher's labels, the reference (with fd)."""
    train, _ = train_pass(model, batch, side, device)
    total = train * 2 + inference(model, batch, side, side, device)
    return total + reference_features(model, batch, side, device) if fd else total


def cpu_step_seconds(arch: str, config: ExperimentConfig, side: int) -> float:
    """The whole hrda method step on this CPU at ``side`` x ``side``: (3-step run - 1-step run) / 2."""
    spec = f"synthetic:?domain={{}}&n=4&size={side}x{side}"
    source = build_dataset(DataSpec.parse(spec.format("source")))
    target = build_dataset(DataSpec.parse(spec.format("fog")))
    method = METHODS.get("hrda")
    options = {**config.method.options, "crop": "", "warmup": 0, "bn-refresh": 0, "fd-weight": 0.0}

    def run(steps: int) -> float:
        torch.manual_seed(0)
        model = build_model(f"hrda_{arch}", CLASSES)
        config = method.make_options({**options, "steps": steps})
        started = time.perf_counter()
        method.load()(model, target, AdaptContext(source=source, progress=False), config)
        return time.perf_counter() - started

    return (run(3) - run(1)) / 2


def read_seconds(kind: str, stored: tuple[int, int], size: tuple[int, int], repeats: int) -> tuple[float, int]:
    """Median seconds to read one frame of ``kind`` stored at ``stored`` (H, W) as ``size``, and its PNG's bytes.

    The frame is a synthetic street scene rendered at the stored size (the project's renderer), so its PNG
    compresses like a smooth photograph rather than like noise; its label is one class.
    """
    image_file, label_file, road = LAYOUT[kind]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for path in (root / image_file, root / label_file):
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render("source", 0, size=stored)[0]).save(root / image_file)
        Image.fromarray(np.full(stored, road, dtype=np.uint8), mode="L").save(root / label_file)
        dataset = build_dataset(DataSpec(kind, str(root), split="all" if kind == "gta5" else "train", size=size))
        dataset[0]  # warm-up: imports, first page faults
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            dataset[0]
            times.append(time.perf_counter() - started)
        return statistics.median(times), (root / image_file).stat().st_size


@dataclass(frozen=True)
class Work:
    """One kind of work of a recipe's run: how many times, what each costs, at which precision."""

    what: str
    count: float
    flops: Flops
    precision: str  # "bf16" (under autocast) or "fp32" (the statistics passes)
    reads: float = 0.0  # frames read from disk (on the CPU) per unit of work

    def gpu_seconds(self, utilisation: float) -> float:
        if self.precision == "bf16":
            return self.count * self.flops.total / (utilisation * PEAK["bf16"])
        per = self.flops.conv / PEAK["tf32"] + self.flops.matmul / PEAK["fp32"]
        return self.count * per / utilisation


def _domain(spec: DataSpec) -> str:
    return spec.kind


def workload(config: ExperimentConfig, options, step: Flops, image: dict[str, Flops]) -> list[Work]:
    """Every forward the comparison runs, from the config: adaptations, their passes, evaluation, recalibration."""
    refreshes = (options.steps - 1) // options.bn_refresh if options.bn_refresh > 0 else 0
    trains = {s.name: FRAMES[_domain(s.data)]["train"] for s in config.sites}
    runs = dict(trains)
    if any(e.name == "data-combination" for e in config.strategies):
        runs["data-combination"] = sum(trains.values())
    site_image = {s.name: image[_domain(s.data)] for s in config.sites}
    mean_image = sum((f for f in site_image.values()), Flops(0, 0)) * (1 / len(site_image))
    work = []
    for run, frames in runs.items():
        per_image = site_image.get(run, mean_image)
        passes = 3 + refreshes  # AdaBN start, refreshes, exact statistics, label-free metrics
        work.append(Work(f"{run}: {options.steps} hrda steps", options.steps, step, "bf16", reads=4))
        work.append(Work(f"{run}: {passes} passes over {frames} frames", passes * frames, per_image, "fp32", reads=1))
    rows = len(config.strategies)
    evaluation = sum(FRAMES[_domain(e.data)]["val"] for e in config.eval_sets)
    eval_image = sum((image[_domain(e.data)] * FRAMES[_domain(e.data)]["val"] for e in config.eval_sets),
                     Flops(0, 0)) * (1 / evaluation)  # fmt: skip
    lmc = 0 if config.lmc is None else 2 * config.lmc.points - 2
    what = f"evaluation: {rows} strategies + {lmc} LMC points x {evaluation} frames"
    work.append(Work(what, (rows + lmc) * evaluation, eval_image, "bf16", reads=1 / (rows + lmc)))  # read once
    recalibrations = sum(1 for e in config.strategies if e.name == "recalibrate")
    work.append(Work(f"recalibration: {recalibrations} x {sum(trains.values())} frames",
                     recalibrations * sum(trains.values()), mean_image, "fp32", reads=1))  # fmt: skip
    work.append(Work(f"label-free scores: {rows} strategies x {len(trains)} sites x 16 frames x 4 passes",
                     rows * len(trains) * 16 * 4, mean_image, "fp32", reads=1 / 4))  # fmt: skip
    return work


@dataclass(frozen=True)
class Measured:
    """What this CPU measured for one recipe's model at the small window."""

    step_seconds: float
    step_flops: Flops
    fp32: SavedBytes
    bf16: SavedBytes

    @property
    def bf16_ratio(self) -> float:
        """Activation bytes saved under bf16 autocast per fp32 byte (weight casts apart)."""
        return self.bf16.activations / self.fp32.activations


def measure(model: MultiResSegmenter, arch: str, config: ExperimentConfig, batch: int, side: int) -> Measured:
    seconds = cpu_step_seconds(arch, config, side)
    flops = step_flops(model, batch, side, "cpu", fd=False)
    return Measured(seconds, flops, train_pass(model, batch, side, "cpu")[1],
                    train_pass(model, batch, side, "cpu", amp="bf16")[1])  # fmt: skip


def _hours(work: list[Work], utilisation: float) -> float:
    return sum(w.gpu_seconds(utilisation) for w in work) / 3600


def _reading_hours(work: list[Work], read: dict[str, float]) -> float:
    """A step reads 2 GTA5 and 2 target frames (``read["step"]`` is their mean); everything else target frames."""
    return sum(w.count * w.reads * read["step" if w.reads == 4 else "target"] for w in work) / 3600


def _work_table(work: list[Work], read: dict[str, float]) -> list[str]:
    low, high = max(UTILISATION), min(UTILISATION)
    lines = [
        f"| work | count | TFLOP each | precision | H100 h at {low} | H100 h at {high} |",
        "|---|---|---|---|---|---|",
    ]
    for w in work:
        lines.append(f"| {w.what} | {w.count:.0f} | {w.flops.total / 1e12:.2f} | {w.precision} | "
                     f"{w.gpu_seconds(low) / 3600:.1f} | {w.gpu_seconds(high) / 3600:.1f} |")  # fmt: skip
    reads = sum(w.count * w.reads for w in work)
    reading = _reading_hours(work, read)
    lines.append(f"| reading {reads:.0f} frames, one CPU core, serial with the GPU | | | measured | "
                 f"{reading:.1f} | {reading:.1f} |")  # fmt: skip
    lines.append(f"| **whole comparison** | | | | **{_hours(work, low) + reading:.0f}** | "
                 f"**{_hours(work, high) + reading:.0f}** |")  # fmt: skip
    return lines


def recipe_rows(name: str, arch: str, args: argparse.Namespace, read: dict[str, float]) -> str:
    config = ExperimentConfig.load(CONFIGS_DIR / f"{name}.toml", data_root="/nonexistent/data")
    options = METHODS.get("hrda").make_options(config.method.options)
    side, batch = options.crop_size()[0], options.batch_size
    fd = bool(config.method.backbone_weights) and options.fd_weight > 0
    torch.manual_seed(0)
    model = build_model(f"hrda_{arch}", CLASSES)
    params = sum(p.numel() for p in model.parameters())
    cpu = measure(model, arch, config, batch, args.side)
    meta = model.to("meta")
    step = step_flops(meta, batch, side, "meta", fd)
    saved = train_pass(meta, batch, side, "meta")[1].activations
    sizes = {e.data.kind: e.data.size for e in config.eval_sets} | {s.data.kind: s.data.size for s in config.sites}
    image = {kind: inference(meta, 1, *size, "meta") for kind, size in sizes.items()}
    work = workload(config, options, step, image)
    fixed = params * 4 * (5 + (1 if fd else 0))  # student, gradients, 2 AdamW moments, teacher (+ reference)
    memory32, memory16 = fixed + saved, fixed + 2 * params + saved * cpu.bf16_ratio
    lines = [f"### {name}: hrda_{arch}, {params / 1e6:.1f} M parameters", ""]
    lines.append(f"- Measured on this CPU, batch {batch} + {batch} at {args.side}x{args.side}: one whole hrda step "
                 f"{cpu.step_seconds:.2f} s; {cpu.step_flops.total / 1e9:.0f} GFLOP counted in it "
                 f"({cpu.step_flops.total / cpu.step_seconds / 1e9:.0f} GFLOP/s); one training pass saves "
                 f"{cpu.fp32.activations / 2**20:.0f} MB of activations at fp32, {cpu.bf16.activations / 2**20:.0f} MB "
                 f"under bf16 autocast (x{cpu.bf16_ratio:.2f}).")  # fmt: skip
    per_image = ", ".join(f"{k} {v.total / 1e12:.2f}" for k, v in image.items())
    lines.append(f"- Counted at the recipe's size (batch {batch} + {batch}, {side}x{side} windows): one hrda step "
                 f"{step.total / 1e12:.1f} TFLOP ({step.conv / step.total:.0%} in convolutions); one inference "
                 f"frame (TFLOP): {per_image}; one training pass saves {saved / GB:.1f} GB of activations at "
                 "fp32.")  # fmt: skip
    lines.append(f"- Memory of a training step, estimated: {fixed / GB:.1f} GB fixed (weights, gradients, AdamW, "
                 f"teacher{', reference' if fd else ''}) + one pass's activations = {memory32 / GB:.0f} GB at fp32, "
                 f"{memory16 / GB:.0f} GB under bf16 autocast (weights cast once, activations "
                 f"x{cpu.bf16_ratio:.2f}).")  # fmt: skip
    held = sum(FRAMES[e.data.kind]["val"] * math.prod(e.data.size) * (3 * 4 + 8) for e in config.eval_sets)
    lines.append(f"- Host memory: the comparison keeps its evaluation frames in memory as float32 images and int64 "
                 f"labels (experiments/tasks.py): {held / GB:.0f} GB.")  # fmt: skip
    site = work[:2]
    lines.append(f"- One site ({site[0].what.split(':')[0]}) alone: {_hours(site, max(UTILISATION)):.1f}-"
                 f"{_hours(site, min(UTILISATION)):.1f} H100 hours of compute + {_reading_hours(site, read):.1f} h "
                 "of frame reading.")  # fmt: skip
    return "\n".join([*lines, "", *_work_table(work, read)])


def read_costs(repeats: int) -> dict[str, float]:
    """Seconds per frame: a training step reads 2 GTA5 and 2 target frames; a pass reads target frames."""
    gta5, gta5_bytes = read_seconds("gta5", (1052, 1914), (1440, 2560), repeats)
    city, city_bytes = read_seconds("cityscapes", (1024, 2048), (1024, 2048), repeats)
    idd, idd_bytes = read_seconds("idd", (1080, 1920), (1024, 2048), repeats)
    print("| frame | stored | read as | PNG MB | read s |\n|---|---|---|---|---|")
    print(f"| gta5 | 1914x1052 | 2560x1440 | {gta5_bytes / 2**20:.1f} | {gta5:.3f} |")
    print(f"| cityscapes | 2048x1024 | 2048x1024 | {city_bytes / 2**20:.1f} | {city:.3f} |")
    print(f"| idd | 1920x1080 | 2048x1024 | {idd_bytes / 2**20:.1f} | {idd:.3f} |\n")
    target = (city + idd) / 2
    return {"step": (2 * gta5 + 2 * target) / 4, "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=128, help="the window side of the CPU measurements")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    read = read_costs(args.repeats)
    for name, arch in RECIPES.items():
        print(recipe_rows(name, arch, args, read), "\n", flush=True)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
