"""The resumable training loop every iterative method shares.

A method supplies one function that performs optimisation step ``t`` from a generator
seeded by (seed, t); the loop owns the schedule, the progress bar, the metrics and the
checkpoints. Because every step's randomness is a function of its index, a run resumed
from a checkpoint at step t ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clients.adaptation.context import AdaptContext
from clients.adaptation.ema import EMATeacher
from clients.adaptation.optim import Schedule, set_lr
from clients.adaptation.sampling import step_generator
from common.device.runtime import Precision, model_device
from common.device.spec import Compute
from common.models.fingerprint import recipe_key, state_fingerprint
from common.models.segmenter import Segmenter

__all__ = ["StepFn", "TrainState", "checkpoint_path", "run_training", "training_precision"]

log = logging.getLogger(__name__)

StepFn = Callable[[int, torch.Generator], dict[str, float]]
"""Performs optimisation step ``t`` and returns scalars; "loss" and "confident" feed the bar."""

_WINDOW = 20  # at most this many steps are averaged for the bar and the metrics


@dataclass
class TrainState:
    """Everything a resumed run needs: weights, optimiser moments, teacher and method extras."""

    model: Segmenter
    optimizer: torch.optim.Optimizer
    teacher: EMATeacher | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)  # e.g. the easy/hard split of a source-free run
    step: int = 0
    precision: Precision = field(default_factory=Precision)  # autocast and the fp16 loss scale

    def to_dict(self, recent: dict[str, list[float]], first: dict[str, list[float]]) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "teacher": self.teacher.model.state_dict() if self.teacher is not None else {},
            "extras": dict(self.extras),
            "recent": {k: torch.tensor(v, dtype=torch.float64, device="cpu") for k, v in recent.items()},
            "first": {k: torch.tensor(v, dtype=torch.float64, device="cpu") for k, v in first.items()},
            "precision": self.precision.state_dict(),
        }

    def load_dict(self, saved: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.teacher is not None:
            self.teacher.model.load_state_dict(saved["teacher"])
        self.extras = dict(saved["extras"])
        self.step = int(saved["step"])
        self.precision.load_state_dict(saved.get("precision", {}))
        recent = {k: v.tolist() for k, v in saved["recent"].items()}
        return recent, {k: v.tolist() for k, v in saved["first"].items()}


def _fingerprint(name: str, config: Any, num_target: int, seed: int, model: Segmenter, compute: Compute) -> str:
    """Same method, options, data size, seed, starting weights and precision -> same checkpoint file.

    The running statistics are left out: they are re-measured before the first step. A CPU
    run at full precision keeps the file name it had before devices existed.
    """
    weights = {k: v for k, v in model.state_dict().items() if "running_" not in k}
    parts = [name, repr(config), num_target, seed, state_fingerprint(weights)]
    return recipe_key(parts + ([compute.recipe()] if compute.recipe() else []), length=16)


def checkpoint_path(
    directory: str, name: str, config: Any, num_target: int, seed: int, model: Segmenter, compute: Compute = Compute()
) -> Path:
    return Path(directory) / f"{name}-{_fingerprint(name, config, num_target, seed, model, compute)}.pt"


def training_precision(model: Segmenter, context: AdaptContext) -> Precision:
    """Autocast and loss scaling for training ``model`` where it lies, at the site's ``amp``."""
    return Precision(model_device(model), context.compute.amp)


def _save(path: Path, state: TrainState, recent: dict[str, deque[float]], first: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state.to_dict({k: list(v) for k, v in recent.items()}, first), tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def run_training(
    state: TrainState,
    step_fn: StepFn,
    schedule: Schedule,
    context: AdaptContext,
    *,
    name: str,
    config: Any,
    num_target: int,
    checkpoint_every: int = 100,
) -> dict[str, float]:
    """Run steps ``state.step .. schedule.steps - 1``, resuming from a matching checkpoint.

    With ``context.checkpoint_dir`` set, the state is saved every ``checkpoint_every``
    steps (0: only at the end) and after the last step.

    Returns the means over the last steps (a quarter of the run, at most 20) of every
    scalar the step function reported, recorded in ``context.metrics`` as ``train-<key>``;
    the means over as many first steps go in as ``train-<key>-start``, so a site's log
    shows whether its loss actually fell.
    """
    path = None
    window = min(_WINDOW, max(1, schedule.steps // 4))
    recent: dict[str, deque[float]] = {}
    first: dict[str, list[float]] = {}
    if context.checkpoint_dir:
        path = checkpoint_path(context.checkpoint_dir, name, config, num_target, context.seed, state.model,
                               context.compute)  # fmt: skip
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            saved_recent, first = state.load_dict(saved)
            recent = {k: deque(v, maxlen=window) for k, v in saved_recent.items()}
            log.info("%s: resuming from %s at step %d of %d", name, path, state.step, schedule.steps)
    bar = tqdm(total=schedule.steps, initial=state.step, desc=name, disable=not context.progress, dynamic_ncols=True)
    try:
        for step in range(state.step, schedule.steps):
            set_lr(state.optimizer, schedule.factor(step))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(context.seed * 1_000_003 + step)  # e.g. dropout, hermetic per step
                stats = step_fn(step, step_generator(context.seed, step))
            state.step = step + 1
            for key, value in stats.items():
                recent.setdefault(key, deque(maxlen=window)).append(float(value))
                if step < window:
                    first.setdefault(key, []).append(float(value))
            bar.update(1)
            bar.set_postfix(
                {k: f"{sum(recent[k]) / len(recent[k]):.3f}" for k in ("loss", "confident") if k in recent},
                refresh=False,
            )
            periodic = checkpoint_every > 0 and state.step % checkpoint_every == 0
            if path is not None and (periodic or state.step == schedule.steps):
                _save(path, state, recent, first)
    finally:
        bar.close()
    means = {k: sum(v) / len(v) for k, v in recent.items() if v}
    context.metrics.update({f"train-{k}": v for k, v in means.items()})
    context.metrics.update({f"train-{k}-start": sum(v) / len(v) for k, v in first.items() if v})
    return means
