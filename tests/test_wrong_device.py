"""No tensor in a site's or an evaluation's path is created without saying where it lives.

On a GPU, a tensor made by ``torch.zeros(...)``, ``torch.tensor(...)``, ``torch.randperm(...)``
... without a device lands on the CPU and fails (or silently syncs) when it meets the
model's CUDA tensors. This machine has no GPU, so the test looks at the cause instead of
the crash: a ``TorchFunctionMode`` records every call of a tensor factory made from the
project's own code without a ``device``, while each path runs end to end on the CPU.

Why not ``torch.set_default_device("meta")`` with the model on the CPU? Measured: a meta
index into a CPU tensor returns zeros silently, ``torch.isin`` against a meta tensor answers
True, and a 0-dimensional meta tensor mixes with CPU tensors without complaint, so the
ClassMix draws and HRDA's feature-distance classes would pass unseen. Recording the call
names the file and line, whichever way the tensor is used afterwards. What it cannot see
is a factory given the wrong device on purpose (``device="cpu"`` in a GPU path) or a batch
that is never moved to the model's device; the ``cuda``-marked tests in
``tests/test_device.py`` run the same paths on a GPU where one exists.

Only the APIs that existed before devices did are used here, so the file can be run
against an older checkout to show what it catches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from clients.adaptation import AdaptContext
from clients.guard import GuardConfig
from clients.site import SiteJob, adapt_site, recalibration_sums
from common.bn.bank import BNBank
from common.bn.stats import bn_count_profile
from common.data import image_batches, make_loader
from common.data.transforms import PhotometricAugment
from common.models.banked import BankedSegmenter
from common.models.factory import build_model
from common.scoring.evaluation import evaluate_domain
from common.scoring.label_free import label_free_scores
from common.training.pretrain import PretrainConfig, train_segmenter

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(ROOT / p for p in ("common", "clients", "server", "experiments", "fedmerge"))
HERE = Path(__file__).resolve()
FACTORIES = {
    torch.zeros, torch.ones, torch.full, torch.empty, torch.empty_strided, torch.eye, torch.arange, torch.linspace,
    torch.logspace, torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.rand, torch.randn, torch.randint,
    torch.randperm,
}  # fmt: skip
NUM_CLASSES = 9


def _project_caller() -> str | None:
    """``file:line`` of the code that called the factory, when it is the project's (not torch's, not a library's)."""
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve() == HERE:  # the mode's own frames
        frame = frame.f_back
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename).resolve()
    return f"{path.relative_to(ROOT)}:{frame.f_lineno}" if any(path.is_relative_to(p) for p in PROJECT) else None


class UnplacedFactories(TorchFunctionMode):
    """Records each tensor factory the project calls without a device (``as_tensor`` of a tensor keeps its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        keeps_device = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
        if func in FACTORIES and kwargs.get("device") is None and not keeps_device:
            where = _project_caller()
            if where is not None:
                self.calls.append(f"{where} torch.{func.__name__}")
        return func(*args, **kwargs)


def _model(state: dict, arch: str = "tiny_unet") -> torch.nn.Module:
    model = build_model(arch, NUM_CLASSES)
    (model.base if arch.startswith("hrda_") else model).load_state_dict(state)
    return model


def _site(method: str, options: dict, arch: str = "tiny_unet", guard: bool = False, source: bool = False,
          backbone: bool = False, checkpoints: bool = False):  # fmt: skip
    """One site's whole work (method, guard, exact statistics, update) with what ``method`` needs at the site."""

    def prepare(state, source_set, target, tmp_path):
        context = AdaptContext(
            source=source_set if source else None,
            checkpoint_dir=str(tmp_path / "checkpoints") if checkpoints else "",
            progress=False,
            seed=1,
            backbone_weights=_backbone_file(state, tmp_path) if backbone else "",
        )
        guard_config = GuardConfig.read({"guard": guard, "guard-score": "agreement,mix"})
        job = SiteJob("fog", method, options, 4, context=context, guard=guard_config)
        model = _model(state, arch)
        return lambda: adapt_site(model, target, job)

    return prepare


def _backbone_file(state: dict, tmp_path: Path) -> str:
    """An "ImageNet" backbone file for HRDA's feature distance: the start's own backbone, by its key names."""
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("backbone.")}, str(path))
    return str(path)


def _evaluation(state, source, target, tmp_path):
    model = _model(state)
    buffers = {k: v for k, v in state.items() if "running_" in k}
    means = {k[: -len(".running_mean")]: torch.stack([v, v + 0.1]) for k, v in buffers.items() if "mean" in k}
    variances = {k[: -len(".running_var")]: torch.stack([v, v * 2]) for k, v in buffers.items() if "var" in k}
    banked = BankedSegmenter(_model(state), BNBank(("a", "b"), means, variances)).eval()

    def run():
        evaluate_domain(model, make_loader(target, 4), NUM_CLASSES)
        evaluate_domain(banked, make_loader(target, 4), NUM_CLASSES)

    return run


def _statistics(state, source, target, tmp_path):
    model = _model(state)

    def run():
        recalibration_sums(model, target, 4, "eval")
        recalibration_sums(model, target, 4, "batch")
        bn_count_profile(model)

    return run


def _label_free(state, source, target, tmp_path):
    candidate, own = _model(state), _model(state)
    return lambda: label_free_scores(candidate, own, image_batches(target, 3), seed=2)


def _pretrain(state, source, target, tmp_path):
    model = _model(state)
    config = PretrainConfig(arch="tiny_unet", steps=2, batch_size=4, class_weight_power=0.5, hard_pixel_fraction=0.5,
                            photometric=PhotometricAugment(p=1.0), progress=False)  # fmt: skip
    return lambda: train_segmenter(model, source, config)


HRDA_OPTIONS = {"steps": 3, "bn-refresh": 2, "warmup": 1, "fd-classes": "1,2"}  # the feature distance's classes
PATHS = {
    "adabn+guard": _site("adabn", {}, guard=True),
    "tent": _site("tent", {"steps": 2}),
    "selftrain": _site("selftrain", {"steps": 3, "augment": True, "bn-refresh": 2, "warmup": 1}),
    "sfda": _site("sfda", {"steps": 3, "augment": True, "bn-refresh": 2, "warmup": 1}),
    "hrda": _site("hrda", HRDA_OPTIONS, arch="hrda_tiny_unet", source=True, backbone=True),
    "hrda-plain+checkpoints": _site("hrda", {"steps": 2, "checkpoint-every": 1}, source=True, checkpoints=True),
    "selftrain+guard": _site("selftrain", {"steps": 2}, guard=True),
    "evaluation": _evaluation,
    "statistics": _statistics,
    "label-free": _label_free,
    "pretrain": _pretrain,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_the_path_creates_no_tensor_without_a_device(path, tiny_pretrained_state, tiny_source, tiny_target, tmp_path):
    run = PATHS[path](tiny_pretrained_state, tiny_source, tiny_target, tmp_path)  # models are built outside the watch
    watch = UnplacedFactories()
    with watch:
        run()
    assert not watch.calls, "tensors created without a device:\n" + "\n".join(sorted(set(watch.calls)))


def test_the_watch_sees_a_factory_without_a_device_and_only_in_project_code():
    """The check itself can fail: a call from a project module is recorded, one with a device or from a library not."""
    from common.scoring import metrics

    watch = UnplacedFactories()
    with watch:
        metrics.per_class_iou(torch.eye(3, dtype=torch.int64, device="cpu"))  # full_like: follows its input
        torch.zeros(2)  # this file is not project code
        exec(compile("import torch\ntorch.zeros(2)\n", str(ROOT / "common" / "fake.py"), "exec"))
        exec(compile("import torch\ntorch.zeros(2, device='cpu')\n", str(ROOT / "common" / "fake.py"), "exec"))
    assert watch.calls == ["common/fake.py:2 torch.zeros"]
