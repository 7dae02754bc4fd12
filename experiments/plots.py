"""PNG plots of a comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.compare import CompareResult, LMCCurve

__all__ = ["PLOT_FILES", "plot_lmc", "plot_strategies", "write_plots"]

PLOT_FILES = ("strategies.png", "lmc.png")


def plot_strategies(result: CompareResult, path: Path) -> Path:
    """Grouped bars: per-domain mIoU and H for every strategy; hatched where the domain is needed at test time."""
    domains = [e.domain for e in result.config.eval_sets]
    series = [*domains, "H"]
    rows = result.rows
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(rows) + 2), 4.8))
    colors = plt.get_cmap("tab10")
    for j, name in enumerate(series):
        values = [100 * (r.harmonic_mean if name == "H" else r.per_domain[name]) for r in rows]
        values = [0.0 if math.isnan(v) else v for v in values]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        color = "black" if name == "H" else colors(j % 10)
        bars = ax.bar(xs, values, width, label=name, color=color, alpha=0.9 if name == "H" else 0.75)
        for bar, row in zip(bars, rows, strict=True):
            if row.test_time_domain:
                bar.set_hatch("//")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.label + (" †" if r.test_time_domain else "") for r in rows], rotation=45, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{result.config.name}: per-domain mIoU and H († needs the domain at test time)")
    ax.legend(ncol=len(series), fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lmc(curve: LMCCurve, path: Path, title: str = "") -> Path:
    """H (and each domain's mIoU, thin) along the line between two site models, for both BN rules."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"linear": ("tab:red", "BN statistics interpolated like weights"),
              "gaussian": ("tab:blue", "Gaussian BN merge")}  # fmt: skip
    dashes = [":", "--", "-.", (0, (1, 4))]
    for rule, (color, label) in styles.items():
        ax.plot(curve.alphas, [100 * v for v in curve.harmonic_mean[rule]], "-o", color=color, label=f"H, {label}")
        for i, d in enumerate(curve.domains):
            values = [100 * v for v in curve.per_domain[rule][d]]
            ax.plot(curve.alphas, values, linestyle=dashes[i % len(dashes)], color=color, alpha=0.6, lw=1,
                    label=f"mIoU {d}" if rule == "gaussian" else None)  # fmt: skip
    ax.set_xlabel(f"alpha  ({curve.sites[0]} → {curve.sites[1]})")
    ax.set_ylabel("mIoU / H (%)")
    ax.set_title(title or "linear mode connectivity between two site models")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: CompareResult, out_dir: Path) -> list[str]:
    """The plots' file names (relative to ``out_dir``), for the Markdown to embed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [plot_strategies(result, out_dir / PLOT_FILES[0]).name]
    if result.lmc is not None:
        names.append(plot_lmc(result.lmc, out_dir / PLOT_FILES[1]).name)
    return names
