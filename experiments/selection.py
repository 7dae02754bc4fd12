"""How well each label-free score would have chosen the merge: rank correlation with the true H, and its pick.

The candidates are the one-shot merges of a comparison (one round, no domain needed at
test time, one model). A score's value for a candidate is the worst site's (a merge must
serve every site); its pick is the candidate with the highest value. Against that pick
stand the fixed default merge and the best candidate in hindsight (by the labeled H).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.scoring.scores import SCORES

__all__ = ["DEFAULT_LABEL", "candidates", "selection_rows", "spearman", "worst_site"]

DEFAULT_LABEL = "merge"  # the row of a comparison that runs the shipped default merge


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    array = np.asarray(values, dtype=np.float64)
    order = array.argsort(kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks; NaN when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def worst_site(values: Mapping[str, float]) -> float:
    return min(values.values()) if values else float("nan")


def candidates(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows a selection round could choose among: one-shot, one model, scored."""
    return [r for r in rows if r["rounds"] == 1 and not r["test_time_domain"] and r.get("label_free")
            and r["name"] != "single"]  # fmt: skip


def selection_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per score: Spearman's rho with H over the candidates, its pick and the pick's H."""
    pool = candidates(rows)
    if len(pool) < 2:
        return []
    h = [r["harmonic_mean"] for r in pool]
    best = max(pool, key=lambda r: r["harmonic_mean"])
    default = next((r for r in pool if r["label"] == DEFAULT_LABEL), None)
    out = []
    for name in SCORES:
        values = [worst_site(r["label_free"].get(name, {})) for r in pool]
        if any(math.isnan(v) for v in values):
            continue
        rho = spearman(values, h)
        pick = pool[max(range(len(pool)), key=lambda i: values[i])]
        out.append({
            "score": name, "spearman": rho, "pick": pick["label"], "pick_h": pick["harmonic_mean"],
            "default_h": default["harmonic_mean"] if default else float("nan"),
            "best": best["label"], "best_h": best["harmonic_mean"],
        })  # fmt: skip
    return out
