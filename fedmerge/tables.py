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
    ev = report.get("eval") or {}
    if ev:
        domains = list(ev["per_domain"])
        row = [100 * (ev["per_domain"][d] or float("nan")) for d in domains] + [
            100 * (ev["harmonic_mean"] or float("nan"))
        ]
        parts.append(markdown_table(["merged model mIoU (%)", *domains, "H"], [["merged", *row]]))
    return "\n\n".join(parts)
