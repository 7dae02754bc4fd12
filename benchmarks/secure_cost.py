"""What secure aggregation costs: wall time and bytes per site against the plain merge.

Two measurements:

* **the merge alone at deeplabv3_resnet50's size** (158.8 MB of float32 per site), in one
  process with no Flower: per site, the plain path (the reply's records, then
  ``MergeEngine.ingest``) against the secure one (key pairs, encrypted Shamir shares for
  every peer, the fixed-point vector and its K masks by AES-CTR; on the server the modular
  sum, the shares' reconstruction and the unmasking); bytes are what each site sends.
* **real simulations of the synthetic preset** (``synthetic-3``'s run config and shipped start,
  with K sites of the synthetic styles, without its evaluation), plain and secure, end to end,
  with the largest difference between the two merged models (relative to each tensor's size).

    .venv/bin/python benchmarks/secure_cost.py --sites 3,8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.config.run import RunConfig  # noqa: E402
from common.merge.engine import MergeEngine  # noqa: E402
from common.secure.layout import merge_layout, merge_segments  # noqa: E402
from common.secure.secagg import SiteSecrets, encode, masked_input, unmask  # noqa: E402
from common.updates.wire import update_to_records, wire_bytes  # noqa: E402
from server.simulation import SimulationPlan, run_simulation  # noqa: E402
from tests.fakes import perturbed, site_update  # noqa: E402

MB = 1e6
STYLES = "fog,night,rain,snow,tint,noise,fog,night"


def deeplab_template() -> dict[str, torch.Tensor]:
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_merge(template: dict, updates: list) -> tuple[float, float, int]:
    """(seconds per site, server seconds, bytes per site) of the plain streaming merge."""
    engine = MergeEngine(RunConfig.defaults().merge_spec(), template)
    site_seconds, sent = 0.0, 0
    started = time.perf_counter()
    for update in updates:
        t = time.perf_counter()
        records = update_to_records(update, "adabn")
        site_seconds += time.perf_counter() - t
        sent = wire_bytes(records)
        engine.ingest(update)
    server = time.perf_counter() - started - site_seconds
    return site_seconds / len(updates), server, sent


def secure_merge(template: dict, updates: list) -> tuple[float, float, int]:
    """(seconds per site, server seconds, bytes per site) of the secure sum, every step in this process."""
    k = len(updates)
    ids = list(range(1, k + 1))
    layout = merge_layout(template, k)
    site_seconds, server_seconds = 0.0, 0.0
    t = time.perf_counter()
    secrets = {i: SiteSecrets.generate() for i in ids}
    public = {i: secrets[i].public() for i in ids}
    shares = {i: secrets[i].shares_for(ids, k // 2 + 1, i, {j: p[0] for j, p in public.items()}) for i in ids}
    opened = {j: {i: secrets[j].open_share(i, shares[i][j], public[i][0], j) for i in ids} for j in ids}
    site_seconds += time.perf_counter() - t
    total = np.zeros(layout.length, dtype=np.uint64)
    for i, update in zip(ids, updates, strict=True):
        t = time.perf_counter()
        y = masked_input(encode(merge_segments(update, template, 1.0, 1.0 / k), layout), secrets[i], i,
                         {j: p[1] for j, p in public.items()})  # fmt: skip
        site_seconds += time.perf_counter() - t
        t = time.perf_counter()
        total += y
        server_seconds += time.perf_counter() - t
    t = time.perf_counter()
    seeds = {n: [opened[j][n][0] for j in ids] for n in ids}
    unmask(total, ids, [], seeds, {}, {j: p[1] for j, p in public.items()})
    server_seconds += time.perf_counter() - t
    keys = sum(len(b) for b in public[1]) + sum(len(c) for c in shares[1].values()) + 8 * k
    sent = keys + 8 * layout.length  # public keys, one share per peer, the masked vector, the seed shares back
    return site_seconds / k, server_seconds, sent


def merge_alone(sites: int) -> dict[str, float]:
    template = deeplab_template()
    updates = [site_update(f"s{i}", perturbed(template, i, 0.01), num_examples=10, per_image=100) for i in range(sites)]
    plain_site, plain_server, plain_bytes = plain_merge(template, updates)
    secure_site, secure_server, secure_bytes = secure_merge(template, updates)
    return {"plain_site": plain_site, "plain_server": plain_server, "plain_bytes": plain_bytes,
            "secure_site": secure_site, "secure_server": secure_server, "secure_bytes": secure_bytes}  # fmt: skip


def simulation(sites: int, secure: bool, out_dir: Path) -> tuple[float, float]:
    """(wall seconds, mean bytes each site sent) of the synthetic-3 preset with ``sites`` sites."""
    plan = dataclasses.replace(SimulationPlan.preset("synthetic-3"), num_sites=sites)
    site_data = ";".join(f"s{i}=synthetic?domain={style}&n=32" for i, style in enumerate(STYLES.split(",")))
    overrides = {"site-data": site_data, "min-sites": sites, "secure-aggregation": secure, "bn-bank": "",
                 "eval-data": "", "eval-sites": False}  # fmt: skip
    started = time.perf_counter()
    report = run_simulation(plan, out_dir, overrides)
    wall = time.perf_counter() - started
    sent = [s["bytes_received"] for s in report["sites"]]
    return wall, float(np.mean(sent))


def largest_difference(plain: Path, secure: Path) -> float:
    """max over tensors of max |secure - plain| / max |plain|: the merged models' disagreement."""
    a, b = load_file(str(plain / "merged.safetensors")), load_file(str(secure / "merged.safetensors"))
    worst = 0.0
    for key, value in a.items():
        scale = float(value.double().abs().max()) or 1.0
        worst = max(worst, float((b[key].double() - value.double()).abs().max()) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(k) for k in args.sites.split(",")]
    print("## The merge alone, deeplabv3_resnet50 (158.8 MB of float32 per site)\n")
    print(
        "| sites | plain s/site | secure s/site | plain server s | secure server s | plain MB/site | secure MB/site |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in counts:
        r = merge_alone(k)
        print(f"| {k} | {r['plain_site']:.2f} | {r['secure_site']:.2f} | {r['plain_server']:.2f} | "
              f"{r['secure_server']:.2f} | {r['plain_bytes'] / MB:.1f} | {r['secure_bytes'] / MB:.1f} |")  # fmt: skip
    print("\n## Simulations, the synthetic-3 preset with K sites (small_unet, AdaBN)\n")
    print("| sites | plain wall s | secure wall s | plain kB/site | secure kB/site | largest relative difference |")
    print("|---|---|---|---|---|---|")
    for k in counts:
        with tempfile.TemporaryDirectory() as tmp:
            plain_dir, secure_dir = Path(tmp) / "plain", Path(tmp) / "secure"
            plain, secure = simulation(k, False, plain_dir), simulation(k, True, secure_dir)
            diff = largest_difference(plain_dir, secure_dir)
        print(f"| {k} | {plain[0]:.1f} | {secure[0]:.1f} | {plain[1] / 1e3:.1f} | {secure[1] / 1e3:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
