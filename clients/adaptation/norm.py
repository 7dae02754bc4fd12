"""BatchNorm during adaptation: which statistics the networks normalise with.

Target batches are small (two to four images), and on CamVid the BN statistics alone
carry most of the dusk gain, so statistics deserve a deliberate choice rather than
whatever ``model.train()`` happens to do. Two student modes are offered:

- ``"train"``: every forward normalises with its own batch (source batches by source
  statistics, target/mixed batches by target ones: domain-specific BN for free);
- ``"frozen"``: BN in eval mode with the exact target statistics, re-measured every
  ``bn_refresh`` steps, so training sees exactly the normalisation the site will ship.

The teacher is always in eval mode with exact target statistics (see :func:`refresh_bn`).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.utils.data import Dataset

from clients.adaptation.configs import check_bn_mode
from common.bn.stats import BNStatsConfig, exact_bn_statistics
from common.data import image_batches

__all__ = [
    "BN_PASS_BATCH",
    "bn_affine_parameters",
    "refresh_bn",
    "refresh_statistics",
    "set_bn_mode",
]

BN_PASS_BATCH = 8  # images per batch of the statistics pass, as the site's final pass uses


def _bn_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def set_bn_mode(model: nn.Module, mode: str) -> None:
    """Put ``model`` in train mode with its BN layers as ``mode`` asks."""
    check_bn_mode(mode)
    model.train()
    if mode == "frozen":
        for m in _bn_modules(model):
            m.eval()


def refresh_bn(model: nn.Module, target: Dataset, batch_size: int = BN_PASS_BATCH) -> None:
    """Install the exact target statistics (an AdaBN pass); leaves the model's mode unchanged."""
    exact_bn_statistics(model, image_batches(target, batch_size), BNStatsConfig(mode="batch"))


def refresh_statistics(
    step: int, every: int, teacher: nn.Module, student: nn.Module, mode: str, target: Dataset
) -> bool:
    """Re-measure target statistics every ``every`` steps (not at step 0: the caller's AdaBN start did).

    The teacher's parameters drift as the student trains, so its statistics must follow;
    a frozen-BN student needs the same, a train-mode student measures its own per batch.
    """
    if every <= 0 or step == 0 or step % every:
        return False
    refresh_bn(teacher, target)
    if mode == "frozen":
        refresh_bn(student, target)
    return True


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The BN scales and shifts: all Tent trains."""
    return [p for m in _bn_modules(model) for p in (m.weight, m.bias) if p is not None]
