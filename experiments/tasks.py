"""The task pool: the labeled evaluation sets every strategy is scored on.

The sets are read once and kept as batches in memory, so dozens of models (strategies,
points on the interpolation line) are scored on exactly the same pixels without reading
or rendering the images again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from common.bn.bank import BNBank
from common.data import build_dataset, make_loader
from common.device.spec import Compute
from common.models.banked import BankedSegmenter
from common.scoring.evaluation import evaluate_domain
from common.scoring.metrics import harmonic_mean
from experiments.config import EvalSet
from experiments.pool import SourceBundle

__all__ = ["Scores", "TaskPool"]


@dataclass(frozen=True)
class Scores:
    per_domain: dict[str, float]  # NaN where the strategy has no model for that domain
    harmonic_mean: float


class TaskPool:
    def __init__(self, eval_sets: tuple[EvalSet, ...], batch_size: int, compute: Compute = Compute()) -> None:
        """``compute``: a resolved device (``common.device.runtime.resolve_compute``) and the evaluation's amp."""
        self.sets, self.compute = eval_sets, compute
        self.batches: dict[str, list[tuple[Tensor, Tensor]]] = {
            e.domain: list(make_loader(build_dataset(e.data), batch_size)) for e in eval_sets
        }
        for domain, batches in self.batches.items():
            if not batches:
                raise ValueError(f"evaluation set {domain!r} is empty")

    @property
    def domains(self) -> list[str]:
        return [e.domain for e in self.sets]

    def num_images(self, domain: str) -> int:
        return sum(images.shape[0] for images, _ in self.batches[domain])

    def score(
        self,
        source: SourceBundle,
        state: Mapping[str, Tensor] | None = None,
        per_site: Mapping[str, Mapping[str, Tensor]] | None = None,
        domains: list[str] | None = None,
        bank: BNBank | None = None,
    ) -> Scores:
        """mIoU per domain and H, for one model or for one model per site (chosen by each set's ``site``)."""
        if (state is None) == (per_site is None):
            raise ValueError("score one model (state) or one per site (per_site), not both or neither")
        wanted = [e for e in self.sets if domains is None or e.domain in domains]
        shared = source.model(state).to(self.compute.device) if state is not None else None
        if shared is not None and bank is not None:
            shared = BankedSegmenter(shared, bank).eval()
        per_domain: dict[str, float] = {}
        for e in wanted:
            if shared is not None:
                model = shared
            elif per_site is not None and e.site in per_site:
                model = source.model(per_site[e.site]).to(self.compute.device)
            else:
                per_domain[e.domain] = float("nan")  # no site holds this domain's local parts
                continue
            score = evaluate_domain(model, self.batches[e.domain], source.num_classes, e.domain, amp=self.compute.amp)
            per_domain[e.domain] = score.miou
        return Scores(per_domain, harmonic_mean(per_domain))
