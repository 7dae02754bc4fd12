"""The run report: who took part, what was refused and why, timings, evaluation."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Incident", "MergeReport", "SiteEntry"]


@dataclass
class SiteEntry:
    domain: str
    node_id: int
    num_examples: int
    bn_values: int  # values per channel behind the first BN layer's statistics
    bytes_received: int
    metrics: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # what the reply held: records and keys
    node_name: str = ""  # the name its key was registered under (deployment), if any
    weight: float = 1.0  # its weight in the parameter merge (after any cap)
    clip_scale: float = 1.0  # 1, or the factor its parameter change was scaled by (clip-norm)


@dataclass
class Incident:
    """A site whose reply did not enter the merge."""

    node_id: int
    domain: str
    kind: str  # "refused" (bad update), "failed" (error reply), "timeout" (no reply in time)
    reason: str
    node_name: str = ""  # the registered name: it labels a site that never said its domain


@dataclass
class MergeReport:
    config: dict[str, Any] = field(default_factory=dict)
    sites: list[SiteEntry] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    census: dict[str, int] = field(default_factory=dict)  # node id -> images claimed before the train round
    secure: dict[str, Any] = field(default_factory=dict)  # secure aggregation: survivors, threshold, error bound
    selection: dict[str, Any] = field(default_factory=dict)  # label-free selection: every score, the choice
    recalibration: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)  # the merged model
    eval_initial: dict[str, Any] = field(default_factory=dict)  # the model every site started from
    eval_sites: dict[str, Any] = field(default_factory=dict)  # each site's own model, when asked for
    evaluation: dict[str, Any] = field(default_factory=dict)  # node id -> the site's label-free scores of the merge
    status: str = "running"
    error: str = ""
    _clock: dict[str, float] = field(default_factory=dict, repr=False)

    def start(self, phase: str) -> None:
        self._clock[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        self.timings[f"{phase}-seconds"] = round(time.perf_counter() - self._clock.pop(phase), 3)

    def incidents_of(self, kind: str) -> list[Incident]:
        return [i for i in self.incidents if i.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_clock")
        out["refused"] = [asdict(i) for i in self.incidents_of("refused")]
        out["failed"] = [asdict(i) for i in self.incidents_of("failed") + self.incidents_of("timeout")]
        out["dropouts"] = [asdict(i) for i in self.incidents_of("dropout")]
        return out

    def write(self, path: Path) -> None:
        """Atomic write, so an interrupted run never leaves half a report."""
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the report")
