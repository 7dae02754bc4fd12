"""The label-free scores by name: the registry the guard, the selection round and the reports read.

Declared without importing torch, so a run config naming a score is checked at once; each
entry's ``target`` is its function in ``common.scoring.label_free`` (``list[Passes] -> float``,
higher is better).
"""

from __future__ import annotations

from common.options.registry import Registry

__all__ = ["SCORES"]

SCORES = Registry("label-free score")
for _name, _fn, _summary in (
    ("agreement", "agreement", "pixels where the candidate agrees with the site's own adapted model"),
    ("neg-entropy", "neg_entropy", "minus the mean normalised prediction entropy"),
    ("confident", "confident", "pixels whose top probability reaches the confidence threshold"),
    ("diversity", "diversity", "entropy of the mean prediction over the site's images, normalised"),
    ("mix", "mix", "ClassMix consistency: pasted classes labelled as the paste implies"),
    ("photometric", "photometric_agreement", "agreement with itself under a brightness and contrast change"),
):
    SCORES.add(_name, target=f"common.scoring.label_free:{_fn}", summary=_summary)
