"""Plain-text and Markdown tables of run reports."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["markdown_table", "report_table"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_table(report: Mapping[str, Any]) -> str:
    """Sites with their counts, then per-domain mIoU and H of the merged model."""
    sites = markdown_table(
        ["site", "node", "images", "BN values/channel", "MB sent"],
        [
            [s["domain"], s["node_id"], s["num_examples"], s["bn_values"], s["bytes_received"] / 2**20]
            for s in report["sites"]
        ],
    )
    parts = [sites]
    problems = report.get("refused", []) + report.get("failed", [])
    if problems:
        parts.append(
            markdown_table(
                ["node", "site", "what", "reason"],
                [[p["node_id"], p["domain"], p["kind"], p["reason"]] for p in problems],
            )
        )
    evals = [("start", report.get("eval_initial"))]
    # sites reply in any order; the table lists them by name, so two runs print the same table
    evals += [(f"site {site} alone", ev) for site, ev in sorted((report.get("eval_sites") or {}).items())]
    evals.append(("merged", report.get("eval")))
    rows = [r for r in (_eval_row(name, ev or {}) for name, ev in evals) if r]
    if rows:
        domains = list(report["eval"]["per_domain"])
        parts.append(markdown_table(["model (mIoU %)", *domains, "H"], rows))
    return "\n\n".join(parts)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _eval_row(name: str, ev: Mapping[str, Any]) -> list[Any]:
    if not ev:
        return []
    return [name, *[_pct(v) for v in ev["per_domain"].values()], _pct(ev["harmonic_mean"])]
