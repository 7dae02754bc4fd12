"""What crosses the wire between a site and the server, as Flower records.

A site reply holds exactly these records and nothing else: ``params`` and ``buffers``
(ArrayRecords), ``counts`` (number of images and values per channel behind each BN
layer), ``info`` (domain and method) and ``metrics`` (unsupervised scalars). A
recalibration reply holds ``bnsums`` (Σx, Σx², n per BN channel), ``counts`` and ``info``.
This is the only module of ``common`` that knows Flower.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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


_NPY_HEADER_MAX = 1 << 16  # a .npy header (version 1 or 2) of any real array fits in this prefix


def _aliasing_tensor(array: Array) -> torch.Tensor:
    """A tensor over the Array's own bytes, without the copy ``np.load`` makes.

    A reply holds a whole model; ``Array.numpy()`` copies each tensor out of its bytes,
    so converting a reply would cost one more model of memory and a pass over it. The
    tensor is read-only in spirit: it shares the reply's immutable bytes.
    Anything unusual (another serialisation, Fortran order, a foreign byte order) takes
    Flower's own copying path, so the values are always the same as ``to_torch_state_dict``.
    """
    if array.stype == "numpy.ndarray":
        head = io.BytesIO(array.data[:_NPY_HEADER_MAX])
        version = np.lib.format.read_magic(head)
        if version in ((1, 0), (2, 0)):
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(head)
            if not fortran_order and not dtype.hasobject and dtype.isnative:
                count = math.prod(shape)
                values = np.frombuffer(array.data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)
                return torch.from_numpy(values)
    return torch.from_numpy(array.numpy())


def _arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # torch warns once that the bytes are not writable; we never write them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: _aliasing_tensor(array) for key, array in record.items()}


def records_to_update(content: RecordDict, fallback_site: str) -> SiteUpdate:
    """Rebuild a :class:`SiteUpdate`; raises ``KeyError`` naming a missing record.

    The update's tensors share memory with the reply's arrays (no copy; they keep those
    bytes alive): do not modify them in place.
    """
    for name in ("params", "buffers", "counts"):
        if name not in content:
            raise KeyError(f"reply has no {name!r} record")
    info = content.get("info", {})
    num_examples, counts = _read_counts(content["counts"])
    metrics = content.get("metrics", {})
    return SiteUpdate(
        site=str(info.get("domain", fallback_site)),
        params=_arrays_to_tensors(content["params"]),
        buffers=_arrays_to_tensors(content["buffers"]),
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
