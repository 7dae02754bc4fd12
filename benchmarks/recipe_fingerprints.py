"""SHA-256 of the merged tensors of the shipped recipes, to show a refactor left every bit as it was.

Runs, through the command line only (so the same script can run before and after a change):

- ``synthetic-3``: the demo preset in Flower's simulation, whole (AdaBN sites, BN bank);
- ``camvid-daydusk``: its hrda recipe at reduced steps (``--steps``): each site adapted with
  ``fedmerge adapt`` from the camvid source, then merged by ``fedmerge merge`` with the default
  spec, with ties + Gaussian BN and with a BN bank; and the same two sites run as a Flower
  simulation whose run config names their data by ``site-data`` specs.

Prints one line per merged model: its name and the SHA-256 over every tensor (name, dtype,
shape, bytes, sorted by name). Compare the output of two checkouts line by line. (Checkouts
before the data-spec run config name the simulated sites with ``domains = "dusk,day"`` and
unnamed ``site-data`` items instead; the sites' names set the order BN statistics pool in.)

    .venv/bin/python benchmarks/recipe_fingerprints.py --source SOURCE.safetensors --work /tmp/fp
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
FEDMERGE = [sys.executable, "-m", "fedmerge"]
SITES = {"dusk": "domain=0001TP&time=first:42", "day": "domain=Seq05VD&time=first:80"}


def tensor_digest(path: Path) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in a safetensors file, sorted by name."""
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run(*args: str) -> None:
    subprocess.run([*FEDMERGE, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def camvid(spec: str, root: str) -> str:
    return f"camvid:{root}?split=all&{spec}"


def adapt_sites(source: Path, root: str, steps: int, work: Path) -> dict[str, Path]:
    out = {}
    for name, spec in SITES.items():
        out[name] = work / f"{name}.safetensors"
        run("adapt", "--method", "hrda", "--model", str(source), "--arch", "hrda_small_unet",
            "--data", camvid(spec, root), "--source", camvid("domain=0016E5", root),
            "--set", f"steps={steps}", "--set", f"bn-refresh={max(1, steps // 2)}",
            "--domain", name, "--threads", "1", "--quiet", "--out", str(out[name]))  # fmt: skip
    return out


def merges(sites: dict[str, Path], base: Path, work: Path) -> dict[str, Path]:
    files = [str(p) for p in sites.values()]
    recipes = {
        "camvid-daydusk merge (default)": [],
        "camvid-daydusk ties+gaussian": ["--method", "ties", "--option", "k=0.5", "--option", "lam=1.0",
                                         "--buffers", "gaussian"],
        "camvid-daydusk bank(own)": ["--bn-bank"],
    }  # fmt: skip
    out = {}
    for i, (name, extra) in enumerate(recipes.items()):
        out[name] = work / f"merge-{i}.safetensors"
        run("merge", *files, "--base", str(base), "--out", str(out[name]), *extra)
    return out


def simulations(root: str, work: Path) -> dict[str, Path]:
    run("simulate", "--preset", "synthetic-3", "--out-dir", str(work / "synthetic-3"), "--quiet")
    site_data = ";".join(f"{name}={camvid(spec, root)}" for name, spec in SITES.items())
    config = work / "camvid-sim.toml"
    config.write_text(
        'num-sites = 2\n[run-config]\narch = "small_unet"\nnum-classes = 11\nmethod = "adabn"\n'
        f'initial-weights = "{work / "source.safetensors"}"\nsite-data = "{site_data}"\n'
    )
    run("simulate", "--config", str(config), "--out-dir", str(work / "camvid-sim"), "--quiet")
    return {"synthetic-3 (simulation)": work / "synthetic-3" / "merged.safetensors",
            "camvid adabn site-data (simulation)": work / "camvid-sim" / "merged.safetensors"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, type=Path, help="the camvid source (plain small_unet checkpoint)")
    parser.add_argument("--base", required=True, type=Path, help="the same source wrapped as hrda_small_unet")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--steps", type=int, default=40, help="hrda steps per site (the recipe's 500 is slow)")
    parser.add_argument("--work", required=True, type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "source.safetensors").write_bytes(args.source.read_bytes())
    sites = adapt_sites(args.source, args.data_root, args.steps, args.work)
    models = {**{f"site {k}": v for k, v in sites.items()}, **merges(sites, args.base, args.work)}
    models.update(simulations(args.data_root, args.work))
    for name, path in models.items():
        print(f"{tensor_digest(path)}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
