"""The server-side merge at scale: time against a memory-bandwidth floor and Flower's FedAvg, and peak memory.

Every site update has the shapes and dtypes of torchvision's deeplabv3_resnet50 (19
classes, no aux head: 362 tensors, 158.8 MB), filled with random values and built on the
fly as Flower ArrayRecords (npy bytes, exactly what ``Array.from_numpy_ndarray`` and a
deserialised reply hold), so the benchmark never holds more than the reply in hand. Each
reply goes through what the server runs per reply, ``ReplyIntake.take_update``:
records_to_update -> MergeEngine.ingest (validate_update, then the method's sums); then
``finish`` (the merged state dict serialised to an ArrayRecord); then the recalibration
round (K replies of BN sums pooled, the merged record's statistics replaced) and the
merged file written from the sums. Parts are timed by wrapping the functions they call
(the wrappers call the originals).

* clocks: CPU time of the process (``time.process_time``: user + system, so page faults
  count) and wall time. Torch runs ``--threads`` intra-op threads (default 1) and NumPy
  one, so CPU time is the work done; wall time adds whatever the machine's other jobs
  took from us. Ratios are given on both clocks; on a shared machine CPU time is the
  stable one.
* floor: NumPy summing a K-long stream of P-byte float32 arrays into one freshly
  allocated output (copy the first, add the rest in place): one read of K*P bytes and
  one write of P. Timed in the same worker before and after the merge; the smaller of
  the two is the floor. Each worker first touches and frees 4 models' worth of memory:
  on this VM a process's first touch of fresh memory costs several times later ones,
  and that should fall on neither the floor nor the merge.
* FedAvg: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, what
  ``FedAvg.aggregate_train`` calls (``aggregate_train`` itself refuses replies with two
  ArrayRecords), on K replies held in a list, as FedAvg needs them; our conversion, sums
  and serialised result are timed on that same list (FedAvg validates nothing, so
  neither does that comparison); 3 interleaved repeats, medians.
* memory: each K runs in a fresh worker process. With imports done and the template
  (which the server holds anyway) and the strategy built, freed heap is trimmed and the
  RSS taken as the baseline; the kernel's high-water mark (VmHWM, reset by writing 5 to
  ``/proc/self/clear_refs``) is reset before each ``receive`` and before ``finish`` and
  read after; the peak over the baseline is divided by one model (158.8 MB). The
  benchmark's own reply generation is measured in separate windows and shown apart.

    .venv/bin/python benchmarks/merge_bench.py                       # ~10 min on 2 shared cores
    .venv/bin/python benchmarks/merge_bench.py --sites 2,8 --float32-sites 8 --fedavg-sites 2   # ~2 min
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord, RecordDict  # noqa: E402

import common.merge.engine as engine_module  # noqa: E402
import server.intake as intake_module  # noqa: E402
import server.strategy as strategy_module  # noqa: E402
from common.bn.stats import BNSums  # noqa: E402
from common.config.run import RunConfig  # noqa: E402
from common.merge.spec import PRECISIONS, method_options  # noqa: E402
from common.updates.site import SiteUpdate, bn_layer_names, split_state  # noqa: E402
from common.updates.wire import numpy_to_array, records_to_update, sums_to_records, update_to_records  # noqa: E402
from server.config import MergeConfig  # noqa: E402
from server.messages import state_record  # noqa: E402
from server.strategy import OneShotMerge  # noqa: E402

PARAM_PRECISIONS = PRECISIONS

MB = 1e6
REPEATS = 3


# ----- clocks --------------------------------------------------------------------------
@dataclass
class Clock:
    """Wall and CPU seconds, added up over several timed stretches."""

    wall: float = 0.0
    cpu: float = 0.0

    def time(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu

    def as_dict(self, name: str) -> dict[str, float]:
        return {f"{name}_wall": self.wall, f"{name}_cpu": self.cpu}


# ----- the model's shapes and the replies ----------------------------------------------
def deeplab_template() -> dict[str, torch.Tensor]:
    """deeplabv3_resnet50's state dict (random init, no weights downloaded)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_template(arch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` with 19 classes (random init): deeplabv3_resnet50 unless another is asked for."""
    if arch == "deeplabv3_resnet50":
        return deeplab_template()
    from common.models.factory import build_model

    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_model(arch, 19).state_dict().items()}


def model_bytes(template: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in template.values())


@dataclass
class Reply:
    """What ``Grid.pull_messages`` hands the strategy: a Message cannot be built outside a run."""

    content: RecordDict
    src_node_id: int

    def has_error(self) -> bool:
        return False

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(src_node_id=self.src_node_id, reply_to_message_id="")


class ReplyMaker:
    """Builds site replies tensor by tensor from one pool of random numbers (a pass per tensor, not a randn)."""

    def __init__(self, template: dict[str, torch.Tensor]) -> None:
        self.template = template
        self.params, self.buffers = split_state(template)
        self.pool = torch.randn(
            max(v.numel() for v in template.values()) * 2, generator=torch.Generator().manual_seed(0)
        )

    def _values(self, like: torch.Tensor, key: str, site: int, index: int) -> torch.Tensor:
        if key.endswith(".num_batches_tracked"):
            return torch.tensor(100 + site, dtype=like.dtype)
        n = like.numel()
        start = (site * 7919 + index * 104729) % (self.pool.numel() - n + 1)
        values = self.pool[start : start + n].reshape(like.shape) * (1.0 + 0.01 * site) + 0.001 * index
        return values.abs_() + 0.5 if key.endswith(".running_var") else values

    def __call__(self, site: int) -> Reply:
        records = {"params": ArrayRecord(), "buffers": ArrayRecord()}
        index = 0
        for name, keys in (("params", self.params), ("buffers", self.buffers)):
            for key, like in keys.items():
                records[name][key] = numpy_to_array(self._values(like, key, site, index).numpy())
                index += 1
        counts = {
            layer: torch.full((self.template[f"{layer}.running_mean"].numel(),), 100 * (10 + site), dtype=torch.int64)
            for layer in bn_layer_names(self.template)
        }
        update = SiteUpdate(f"site-{site}", {}, {}, counts, 10 + site, {"mean-entropy": 0.5})
        content = update_to_records(update, "adabn")
        content["params"], content["buffers"] = records["params"], records["buffers"]
        return Reply(content, site)


# ----- memory --------------------------------------------------------------------------
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss(trim: bool = True, collect: bool = False) -> int:
    """Reset the kernel's RSS high-water mark (after giving freed heap back); return the RSS in bytes.

    Trimming keeps memory that the benchmark's own reply generation freed (but malloc
    kept) from being counted as the merge's. It is skipped before ``finish``: a trimmed
    heap makes the merged record's allocations fault in fresh pages, which a server that
    just freed a reply would not pay. A full garbage collection (0.2 s here) is only
    needed once, for the baseline: replies are freed by reference counting.
    """
    if collect:
        gc.collect()
    if trim:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes``: on this VM a process's first touch of fresh memory costs several times later ones."""
    block = np.empty(nbytes // 8, dtype=np.float64)
    block.fill(0.0)
    del block


# ----- the floor and the merge ---------------------------------------------------------
class Floor:
    """NumPy, one thread: a K-long stream of P-byte float32 arrays summed into one fresh output.

    The first array is copied into a newly allocated output, the others added in place:
    one read of K*P bytes and one write of P (plus re-reading the output, as any running
    sum over a stream must). The stream alternates two arrays, both far larger than cache.
    """

    def __init__(self, nbytes: int) -> None:
        n = nbytes // 4
        self.stream = [torch.randn(n).numpy(), torch.randn(n).numpy()]

    def run(self, k: int) -> Clock:
        clock = Clock()
        out = clock.time(np.empty, self.stream[0].size, dtype=np.float32)
        clock.time(np.copyto, out, self.stream[0])
        for i in range(1, k):
            clock.time(np.add, out, self.stream[i % 2], out=out)
        return clock


class Timers:
    """Wraps the functions ``take_update`` and ``finish`` call, to split their time."""

    def __init__(self, strategy: OneShotMerge) -> None:
        self.clocks = {"convert": Clock(), "validate": Clock(), "add": Clock(), "serialise": Clock()}
        intake_module.records_to_update = self._timed("convert", intake_module.records_to_update)
        engine_module.validate_update = self._timed("validate", engine_module.validate_update)
        strategy_module.numpy_to_array = self._timed("serialise", strategy_module.numpy_to_array)
        strategy.engine.params.add = self._timed("add", strategy.engine.params.add)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = self.clocks[name]
        return lambda *args, **kwargs: clock.time(fn, *args, **kwargs)


def finite_check(content: RecordDict) -> None:
    """Checking a reply for NaN/Inf by one sum per tensor (what validation could do; it does not).

    A sum is finite only if every value is, so ``isfinite(t.sum())`` proves a tensor
    clean in one read; only a non-finite sum would need the per-value check.
    """
    for tensor in records_to_update(content, "probe").state_dict().values():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            raise RuntimeError("benchmark replies are finite")


def merge_config(precision: str, method: str = "linear") -> MergeConfig:
    spec = dataclasses.replace(
        RunConfig.defaults().merge_spec(), precision=precision, method=method, options=method_options(method, {})
    )
    return MergeConfig(spec, min_sites=1, timeout=600.0, recalibrate=True, recalibrate_mode="batch")


def sums_reply(template: dict[str, torch.Tensor], site: int) -> Reply:
    """A recalibration reply: Σx, Σx², n per BN channel, as a site sends them."""
    sums = {}
    for layer in bn_layer_names(template):
        c = template[f"{layer}.running_mean"].numel()
        n = torch.full((c,), 1000 + site, dtype=torch.int64)
        mean = torch.linspace(-1, 1, c, dtype=torch.float64) * (1 + 0.01 * site)
        sums[layer] = BNSums(mean * n, (mean * mean + 1.0) * n, n)
    return Reply(sums_to_records(sums, 10 + site, f"site-{site}"), site)


def recalibrate_and_save(strategy: OneShotMerge, arrays: ArrayRecord, k: int, path: Path) -> None:
    """The second round as the server runs it, then the merged file written from the sums."""
    template = strategy.engine.template
    for site in range(k):
        if not strategy.intake.take_sums(sums_reply(template, site), site, f"site-{site}"):
            raise RuntimeError(f"recalibration of site {site} refused: {strategy.report.incidents[-1].reason}")
    for key, tensor in strategy.engine.apply_recalibration().items():
        arrays[key] = numpy_to_array(tensor.numpy())
    strategy.engine.save(path, "deeplabv3_resnet50", 19)


def merge(
    template: dict[str, torch.Tensor], replies: Callable[[int], Reply], k: int, precision: str, method: str
) -> dict:
    """Stream K replies through the server's per-reply path, finish, recalibrate, save; times and peak memory.

    Memory: the RSS before the first reply is the baseline; the high-water mark is reset
    before each reply and before ``finish`` and the second round, and read after, so the
    merge peak is what the server holds (sums, the reply in hand, the merge's
    temporaries). Windows around the benchmark's own reply generation give the peak with
    generation included.
    """
    strategy = OneShotMerge(merge_config(precision, method), template)
    timers = Timers(strategy)
    receive, finish, check, second = Clock(), Clock(), Clock(), Clock()
    baseline = reset_peak_rss(collect=True)
    streaming_peak = generation_peak = 0
    for site in range(k):
        reset_peak_rss(trim=False)
        reply = replies(site)
        generation_peak = max(generation_peak, peak_rss() - baseline)
        reset_peak_rss()
        if not receive.time(strategy.intake.take_update, reply, site):
            raise RuntimeError(f"site {site} refused: {strategy.report.incidents[-1].reason}")
        streaming_peak = max(streaming_peak, peak_rss() - baseline)
        check.time(finite_check, reply.content)
        del reply
    reset_peak_rss(trim=False)
    arrays, _ = finish.time(strategy.finish)
    finish_peak = peak_rss() - baseline
    reset_peak_rss(trim=False)
    with tempfile.TemporaryDirectory() as tmp:
        second.time(recalibrate_and_save, strategy, arrays, k, Path(tmp) / "merged.safetensors")
    second_peak = peak_rss() - baseline
    del arrays
    out: dict[str, Any] = {
        "method": method,
        "sums_bytes": strategy.engine.params.nbytes,
        "baseline_bytes": baseline,
        "streaming_peak_bytes": streaming_peak,
        "finish_peak_bytes": finish_peak,
        "second_round_peak_bytes": second_peak,
        "peak_bytes": max(streaming_peak, finish_peak, second_peak),
        "peak_with_generation_bytes": max(streaming_peak, finish_peak, second_peak, generation_peak),
        **receive.as_dict("receive"),
        **finish.as_dict("finish"),
        **second.as_dict("second_round"),
        **check.as_dict("finite_check"),
    }
    for name, clock in timers.clocks.items():
        out.update(clock.as_dict(name))
    return out


def worker_stream(k: int, precision: str, skip_validate: bool, method: str, arch: str = "deeplabv3_resnet50") -> dict:
    if skip_validate:  # a what-if, reported as such: the merge without common/updates/validation.py's checks
        engine_module.validate_update = lambda update, template: None
    template = model_template(arch)
    size = model_bytes(template)
    floor = Floor(size)
    warm_memory(4 * size)  # more than the floor or the merge will allocate
    before = floor.run(k)
    result = merge(template, ReplyMaker(template), k, precision, method)
    after = floor.run(k)
    best = min(before, after, key=lambda c: c.cpu)
    out = {"k": k, "precision": precision, "skip_validate": skip_validate, "model_bytes": size}
    return {**out, **best.as_dict("floor"), **result}


def merge_without_validation(template: dict[str, torch.Tensor], replies: list[Reply], precision: str) -> Clock:
    """Our per-reply conversion and sums, then the serialised result, on replies already in memory."""
    engine = OneShotMerge(merge_config(precision), template).engine
    clock = Clock()

    def add(reply: Reply) -> None:  # the engine's two folds, without the validation ``ingest`` runs first
        update = records_to_update(reply.content, "site")
        engine.params.add(update.params, 1.0, 1.0)
        engine.buffers.add(update, engine.buffers.moments(update, 1.0))
        engine.accepted.append(engine_module.Accepted(update.site, 1, 1, 1.0, 1.0))

    for reply in replies:
        clock.time(add, reply)
    clock.time(lambda: state_record(engine.iter_result()))
    return clock


def worker_fedavg(k: int) -> dict:
    """FedAvg's array aggregation and ours (validation left out: FedAvg has none) on the same K replies."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    template = deeplab_template()
    warm_memory(4 * model_bytes(template))
    make = ReplyMaker(template)
    replies = [make(site) for site in range(k)]
    runs: dict[str, list[Clock]] = {"fedavg": [], **{p: [] for p in PARAM_PRECISIONS}}
    for _ in range(REPEATS):  # interleaved, so the machine's load hits each alike
        gc.collect()
        clock = Clock()
        clock.time(aggregate_arrayrecords, [r.content for r in replies], "num-examples")
        runs["fedavg"].append(clock)
        for precision in PARAM_PRECISIONS:
            gc.collect()
            runs[precision].append(merge_without_validation(template, replies, precision))
    out: dict[str, Any] = {"k": k, "model_bytes": model_bytes(template)}
    for name, clocks in runs.items():
        out[f"{name}_wall"] = statistics.median(c.wall for c in clocks)
        out[f"{name}_cpu"] = statistics.median(c.cpu for c in clocks)
    return out


# ----- the driver ----------------------------------------------------------------------
def run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge_cpu(r: dict) -> float:
    return r["receive_cpu"] + r["finish_cpu"]


def _merge_wall(r: dict) -> float:
    return r["receive_wall"] + r["finish_wall"]


def time_table(rows: list[dict]) -> str:
    lines = [
        "| method, sums | K | floor CPU s | server path CPU s | / floor CPU | (wall) | validate CPU s | "
        "without validate / floor CPU | (wall) | without validate or serialise / floor CPU | "
        "convert CPU s | add CPU s | result CPU s | serialise CPU s | finite check by sums CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu, wall, floor = _merge_cpu(r), _merge_wall(r), r["floor_cpu"]
        rest_cpu, rest_wall = cpu - r["validate_cpu"], wall - r["validate_wall"]
        lines.append(
            f"| {r.get('method', 'linear')}, {_label(r)} | {r['k']} | {floor:.3f} | {cpu:.2f} | {cpu / floor:.1f} | "
            f"{wall / r['floor_wall']:.1f} | {r['validate_cpu']:.2f} | {rest_cpu / floor:.2f} | "
            f"{rest_wall / r['floor_wall']:.2f} | {(rest_cpu - r['serialise_cpu']) / floor:.2f} | "
            f"{r['convert_cpu']:.3f} | {r['add_cpu']:.3f} | {r['finish_cpu'] - r['serialise_cpu']:.3f} | "
            f"{r['serialise_cpu']:.3f} | {r['finite_check_cpu']:.3f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = [
        "| method, sums | K | baseline RSS MB | sums / model | peak over baseline / model | while streaming | "
        "finish | recalibrate + save | peak - sums - one reply, MB | with reply generation / model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = r["model_bytes"]
        rest = (r["peak_bytes"] - r["sums_bytes"] - size) / MB
        lines.append(
            f"| {r['method']}, {_label(r)} | {r['k']} | {r['baseline_bytes'] / MB:.0f} | "
            f"{r['sums_bytes'] / size:.2f} | "
            f"{r['peak_bytes'] / size:.2f} | {r['streaming_peak_bytes'] / size:.2f} | "
            f"{r['finish_peak_bytes'] / size:.2f} | {r['second_round_peak_bytes'] / size:.2f} | {rest:.0f} | "
            f"{r['peak_with_generation_bytes'] / size:.2f} |"
        )
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row["precision"] + (", validate_update off (what-if)" if row.get("skip_validate") else "")


def fedavg_table(rows: list[dict], streamed: list[dict]) -> str:
    lines = [
        "| K | FedAvg CPU s | ours float64 CPU s | float64/FedAvg CPU | (wall) | ours float32 CPU s | "
        "float32/FedAvg CPU | (wall) | server path with validate, float64 / FedAvg CPU | float32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fc, fw = r["fedavg_cpu"], r["fedavg_wall"]
        full = []
        for precision in PARAM_PRECISIONS:
            match = [s for s in streamed if (s["k"], s["precision"], s["skip_validate"]) == (r["k"], precision, False)]
            full.append(f"{_merge_cpu(match[0]) / fc:.1f}" if match else "-")
        lines.append(
            f"| {r['k']} | {fc:.2f} | {r['float64_cpu']:.2f} | {r['float64_cpu'] / fc:.2f} | "
            f"{r['float64_wall'] / fw:.2f} | {r['float32_cpu']:.2f} | {r['float32_cpu'] / fc:.2f} | "
            f"{r['float32_wall'] / fw:.2f} | {full[0]} | {full[1]} |"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="2,8,32,64", help="K values for float64 sums (the server's default)")
    parser.add_argument("--float32-sites", default="2,8,32,64", help="K values for float32 sums")
    parser.add_argument("--fedavg-sites", default="2,8,32", help="K values for FedAvg (it holds K models)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the workers")
    parser.add_argument("--worker", choices=["stream", "fedavg"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--skip-validate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="linear", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="deeplabv3_resnet50", help=argparse.SUPPRESS)
    parser.add_argument("--ties-sites", default="8", help="K values for the streaming TIES merge (float64 sums)")
    parser.add_argument(
        "--no-validate-sites", default="2,64", help="K values for a what-if run with validate_update switched off"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "stream":
        print(json.dumps(worker_stream(args.k, args.precision, args.skip_validate, args.method, args.arch)))
        return
    if args.worker == "fedavg":
        print(json.dumps(worker_fedavg(args.k)))
        return

    start = time.perf_counter()
    print(f"torch {torch.__version__} ({args.threads} intra-op thread(s)), numpy {np.__version__}", flush=True)
    rows = []
    plan = [("float64", args.sites, []), ("float32", args.float32_sites, [])]
    plan += [("float64", args.ties_sites, ["--method", "ties"])]
    plan += [(p, args.no_validate_sites, ["--skip-validate"]) for p in PARAM_PRECISIONS]
    for precision, sites, extra in plan:
        for k in _ints(sites):
            worker = ["--worker", "stream", "--k", str(k), "--precision", precision, "--threads", str(args.threads)]
            rows.append(run_worker(worker + extra))
            print(
                f"  stream {precision} K={k} {extra}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True
            )
    if rows:
        print(f"\nmodel: deeplabv3_resnet50, 19 classes, {rows[0]['model_bytes'] / MB:.1f} MB per site update\n")
        print(time_table(rows))
        print()
        print(memory_table(rows))
    fed = []
    for k in _ints(args.fedavg_sites):
        fed.append(run_worker(["--worker", "fedavg", "--k", str(k), "--threads", str(args.threads)]))
        print(f"  fedavg K={k}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    if fed:
        print()
        print(fedavg_table(fed, rows))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
