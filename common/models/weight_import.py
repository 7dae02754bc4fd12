"""Published weights as a fedmerge start: ImageNet encoder files and DAFormer/HRDA checkpoints.

Three layouts are read, each by a list of prefix rules (first match wins):

- ``mit``: the ImageNet MiT release of SegFormer (``patch_embed1.proj.weight``,
  ``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``, ``norm1.weight`` ...), the
  encoder DAFormer and HRDA start from; its ImageNet classifier ``head.*`` is dropped;
- ``resnet``: a torchvision ImageNet ResNet (``conv1``, ``bn1``, ``layer1`` ...); ``fc.*`` is dropped;
- ``daformer``: an mmsegmentation UDA checkpoint of DAFormer or HRDA
  (``{"state_dict": {"model.*", "ema_model.*", "imnet_model.*"}}``); one branch becomes
  the model (the EMA teacher ``ema_model`` unless told otherwise), HRDA's
  ``decode_head.head.*`` as well as DAFormer's ``decode_head.*`` becoming the head.

An encoder file fills the backbone and the head starts from the seeded initialisation;
a DAFormer checkpoint must fill the whole base model. The file is refused, with every
missing, unexpected and misshapen key named, unless it fits exactly: a start that half
loaded would be merged by name and spread the mistake to every site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from common.models.catalog import HRDA_PREFIX
from common.models.checkpoints import save_checkpoint
from common.models.factory import build_model
from common.models.segmenter import Segmenter
from common.models.weights import load_weights_file

__all__ = ["LAYOUTS", "UDA_BRANCHES", "ImportReport", "Rule", "import_weights", "map_keys", "write_imported"]

UDA_BRANCHES = ("ema_model", "model", "imnet_model")
_REASONS = {
    "ema_model": "the EMA teacher",
    "model": "the student (DAFormer's and HRDA's own test code evaluates this one)",
    "imnet_model": "the frozen ImageNet copy behind the feature distance",
}


@dataclass(frozen=True)
class Rule:
    """Keys starting with ``source`` get ``target`` in its place, or are dropped (``target=None``) for ``reason``."""

    source: str
    target: str | None
    reason: str = ""


@dataclass
class ImportReport:
    """What became of every tensor of the file, for the user to check before a federation starts from it."""

    layout: str
    mapped: dict[str, str] = field(default_factory=dict)  # model key -> file key
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> file keys
    fresh: list[str] = field(default_factory=list)  # model keys left at the seeded initialisation

    def lines(self, shown: int = 3) -> list[str]:
        out = [f"{len(self.mapped)} tensors mapped from the {self.layout} file"]
        for reason, keys in self.dropped.items():
            more = f" ... (+{len(keys) - shown})" if len(keys) > shown else ""
            out.append(f"dropped {len(keys)} ({reason}): {', '.join(keys[:shown])}{more}")
        if self.fresh:
            more = f" ... (+{len(self.fresh) - shown})" if len(self.fresh) > shown else ""
            out.append(f"{len(self.fresh)} model tensors start fresh (seeded): {', '.join(self.fresh[:shown])}{more}")
        return out


def _uda_rules(branch: str) -> list[Rule]:
    if branch not in UDA_BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; choose one of {', '.join(UDA_BRANCHES)}")
    rules = [
        Rule(f"{branch}.backbone.", "backbone."),
        Rule(f"{branch}.decode_head.head.", "classifier."),  # HRDA wraps DAFormer's head as .head
        Rule(f"{branch}.decode_head.scale_attention.", None, "HRDA's scale attention: hrda_ models have their own"),
        Rule(f"{branch}.decode_head.", "classifier."),
        Rule(f"{branch}.auxiliary_head.", None, "an auxiliary training head"),
    ]
    return rules + [Rule(f"{other}.", None, _REASONS[other]) for other in UDA_BRANCHES if other != branch]


LAYOUTS = {
    "mit": lambda branch: [Rule("head.", None, "the ImageNet classifier"), Rule("", "backbone.")],
    "resnet": lambda branch: [Rule("fc.", None, "the ImageNet classifier"), Rule("", "backbone.")],
    "daformer": _uda_rules,
}
_COUNTER = ".num_batches_tracked"
_UNMATCHED = "no rule of the layout matches"  # not dropped quietly: such file keys are refused as unexpected
_WHOLE_MODEL = {"daformer"}  # layouts that must fill the whole base model, not only its backbone


def map_keys(state: Mapping[str, Tensor], rules: Sequence[Rule], prefix: str = "") -> tuple[dict, dict, dict]:
    """(model key -> tensor, model key -> file key, reason -> dropped file keys) under ``rules``."""
    tensors, names, dropped = {}, {}, {}
    for key, value in state.items():
        rule = next((r for r in rules if key.startswith(r.source)), None)
        if rule is None:
            dropped.setdefault(_UNMATCHED, []).append(key)
        elif rule.target is None:
            dropped.setdefault(rule.reason, []).append(key)
        else:
            target = prefix + rule.target + key[len(rule.source) :]
            tensors[target], names[target] = value, key
    return tensors, names, dropped


def _misfits(
    model: Mapping[str, Tensor], mapped: Mapping[str, Tensor], required: str, unmatched: Sequence[str]
) -> list[str]:
    """Every reason ``mapped`` does not fit ``model`` exactly where it must (keys under ``required``).

    ``unmatched``: file keys that no rule of the layout maps or drops; they count as unexpected.
    """
    unexpected = sorted(k for k in mapped if k not in model) + [f"{k} (in the file)" for k in unmatched]
    shapes = [f"{k} {tuple(v.shape)} (model {tuple(model[k].shape)})"
              for k, v in mapped.items() if k in model and model[k].shape != v.shape]  # fmt: skip
    # A BN batch counter may be absent (older torchvision files): it starts at 0, as torch itself fills it.
    missing = sorted(k for k in model if k.startswith(required) and k not in mapped and not k.endswith(_COUNTER))
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys)}")
    return problems


def _num_classes(mapped: Mapping[str, Tensor], model_key: str) -> int:
    weight = mapped.get(model_key)
    if weight is None:
        raise ValueError(f"the file has no classifier ({model_key}) to read the number of classes from")
    return int(weight.shape[0])


def import_weights(
    path: str | Path, layout: str, arch: str, num_classes: int = 0, branch: str = "ema_model", seed: int = 0
) -> tuple[Segmenter, ImportReport]:
    """``arch`` (``num_classes`` outputs; 0: the file's own, for a whole-model layout) holding the file's weights."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    path = Path(path)
    state = load_weights_file(path)
    prefix = "base." if arch.startswith(HRDA_PREFIX) else ""  # the wrapper keeps its base model there
    tensors, names, dropped = map_keys(state, LAYOUTS[layout](branch), prefix)
    if num_classes < 1:
        if layout not in _WHOLE_MODEL:
            raise ValueError(f"an encoder file ({layout}) does not say how many classes: give num_classes")
        num_classes = _num_classes(tensors, f"{prefix}classifier.conv_seg.weight")
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    target = model.state_dict()
    required = prefix if layout in _WHOLE_MODEL else f"{prefix}backbone."
    problems = _misfits(target, tensors, required, dropped.pop(_UNMATCHED, []))
    if problems:
        raise ValueError(f"{path}: the {layout} weights do not fit {arch}: " + "; ".join(problems))
    model.load_state_dict({**target, **tensors})
    fresh = [k for k in target if k not in tensors]
    return model, ImportReport(layout, names, dropped, fresh)


def write_imported(
    model: Segmenter, report: ImportReport, source: str | Path, out: str | Path, arch: str,
    classes: Sequence[str] | None = None,
) -> Path:  # fmt: skip
    """The imported model as a ``checkpoint/1`` start (``initial-weights``, ``--model``, ``--backbone-weights``)."""
    num_classes = model.final_layer().out_channels
    names = list(classes) if classes else [f"class{i}" for i in range(num_classes)]
    extra = {"imported-from": Path(source).name, "import-layout": report.layout}
    return save_checkpoint(model, out, arch, names, extra)
