"""What the mean-teacher methods (selftrain, sfda, hrda) share: options, start, schedule.

All three start from AdaBN so that the teacher's first labels already see target
statistics, learn with AdamW (head x10, warm-up then poly), and label with an EMA
teacher kept on exact target statistics. Keeping that in one place means the three
differ only in their step function, which is where they really differ.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from clients.adaptation.configs import TeacherStudentConfig
from clients.adaptation.context import AdaptContext
from clients.adaptation.ema import EMATeacher
from clients.adaptation.loop import StepFn, TrainState, run_training, training_precision
from clients.adaptation.norm import refresh_bn
from clients.adaptation.optim import Schedule, build_optimizer
from common.models.segmenter import Segmenter

__all__ = ["TeacherStudentConfig", "run_teacher_student", "start_teacher_student"]


def start_teacher_student(
    model: Segmenter,
    target: Dataset,
    config: TeacherStudentConfig,
    context: AdaptContext,
    ema_max: float | None = None,
) -> tuple[TrainState, EMATeacher]:
    """AdaBN on the target, then the EMA teacher (a copy, on the student's device), the optimiser and the precision."""
    refresh_bn(model, target)
    teacher = EMATeacher(model, config.ema_max if ema_max is None else ema_max)
    optimizer = build_optimizer(model, config.lr, config.head_lr_mult, config.weight_decay)
    return TrainState(model, optimizer, teacher, precision=training_precision(model, context)), teacher


def run_teacher_student(
    state: TrainState,
    step: StepFn,
    context: AdaptContext,
    config: TeacherStudentConfig,
    name: str,
    num_target: int,
) -> dict[str, float]:
    """The resumable loop on the method's step, with the shared warm-up + poly schedule."""
    return run_training(
        state, step, Schedule(config.steps, config.warmup), context,
        name=name, config=config, num_target=num_target, checkpoint_every=config.checkpoint_every,
    )  # fmt: skip
