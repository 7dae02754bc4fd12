"""What crosses the wire between a site and the server, as Flower records.

A site reply holds exactly these records and nothing else: ``params`` and ``buffers``
(ArrayRecords), ``counts`` (number of images and values per channel behind each BN
layer), ``info`` (domain and method) and ``metrics`` (unsupervised scalars). A
recalibration reply holds ``bnsums`` (Σx, Σx², n per BN channel), ``counts`` and ``info``.
This is the only module of ``common`` that knows Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.bnstats import BNSums
from common.merging import SiteUpdate

__all__ = [
    "RECALIBRATION_RECORDS",
    "REPLY_RECORDS",
    "manifest",
    "records_to_sums",
    "records_to_update",
    "sums_to_records",
    "update_to_records",
]

REPLY_RECORDS = frozenset({"params", "buffers", "counts", "info", "metrics"})
RECALIBRATION_RECORDS = frozenset({"bnsums", "counts", "info"})
_LAYER = "bn:"


def _counts_record(num_examples: int, counts: Mapping[str, torch.Tensor]) -> MetricRecord:
    record: dict[str, int | list[int]] = {"num-examples": int(num_examples)}
    record.update({f"{_LAYER}{layer}": [int(v) for v in n.reshape(-1)] for layer, n in counts.items()})
    return MetricRecord(record)


def _read_counts(record: MetricRecord) -> tuple[int, dict[str, torch.Tensor]]:
    num_examples = int(record["num-examples"])
    counts = {
        k[len(_LAYER) :]: torch.tensor(v if isinstance(v, list) else [v], dtype=torch.int64)
        for k, v in record.items()
        if k.startswith(_LAYER)
    }
    return num_examples, counts


def update_to_records(update: SiteUpdate, method: str) -> RecordDict:
    metrics = {k: float(v) for k, v in update.metrics.items()}
    return RecordDict(
        {
            "params": ArrayRecord({k: v.detach().cpu() for k, v in update.params.items()}),
            "buffers": ArrayRecord({k: v.detach().cpu() for k, v in update.buffers.items()}),
            "counts": _counts_record(update.num_examples, update.counts),
            "info": ConfigRecord({"domain": update.site, "method": method}),
            "metrics": MetricRecord(metrics),
        }
    )


def records_to_update(content: RecordDict, fallback_site: str) -> SiteUpdate:
    """Rebuild a :class:`SiteUpdate`; raises ``KeyError`` naming a missing record."""
    for name in ("params", "buffers", "counts"):
        if name not in content:
            raise KeyError(f"reply has no {name!r} record")
    info = content.get("info", {})
    num_examples, counts = _read_counts(content["counts"])
    metrics = content.get("metrics", {})
    return SiteUpdate(
        site=str(info.get("domain", fallback_site)),
        params=content["params"].to_torch_state_dict(),
        buffers=content["buffers"].to_torch_state_dict(),
        counts=counts,
        num_examples=num_examples,
        metrics={k: float(v) for k, v in metrics.items()},
    )


def sums_to_records(sums: Mapping[str, BNSums], num_examples: int, site: str) -> RecordDict:
    arrays: dict[str, torch.Tensor] = {}
    for layer, s in sums.items():
        arrays[f"{layer}.sum"] = s.sum
        arrays[f"{layer}.sum_sq"] = s.sum_sq
        arrays[f"{layer}.count"] = s.count
    return RecordDict(
        {
            "bnsums": ArrayRecord(arrays),
            "counts": MetricRecord({"num-examples": int(num_examples)}),
            "info": ConfigRecord({"domain": site}),
        }
    )


def records_to_sums(content: RecordDict) -> dict[str, BNSums]:
    arrays = content["bnsums"].to_torch_state_dict()
    layers = [k[: -len(".sum_sq")] for k in arrays if k.endswith(".sum_sq")]
    return {
        layer: BNSums(arrays[f"{layer}.sum"], arrays[f"{layer}.sum_sq"], arrays[f"{layer}.count"]) for layer in layers
    }


def manifest(content: RecordDict) -> dict[str, dict[str, object]]:
    """An inventory of a reply: record names, kinds and keys (tensor names, not values).

    The server keeps it in the report so anyone can audit what each site sent.
    """
    out: dict[str, dict[str, object]] = {}
    for name, record in content.items():
        entry: dict[str, object] = {"type": type(record).__name__}
        if isinstance(record, ArrayRecord):
            entry["keys"] = sorted(record.keys())
            entry["bytes"] = record.count_bytes()
        elif isinstance(record, ConfigRecord):
            entry["items"] = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}
            entry["keys"] = sorted(record.keys())
        else:
            entry["keys"] = sorted(record.keys())
            entry["value_types"] = sorted({type(v).__name__ for v in record.values()})
        out[name] = entry
    return out
