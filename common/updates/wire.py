"""What crosses the wire between a site and the server, as Flower records.

A site reply holds exactly these records and nothing else: ``params`` and ``buffers``
(ArrayRecords), ``counts`` (number of images and values per channel behind each BN
layer), ``info`` (domain and method) and ``metrics`` (unsupervised scalars). A
recalibration reply holds ``bnsums`` (Σx, Σx², n per BN channel), ``counts`` and ``info``.
Each kind of message has its own type (:class:`Action`), which Flower routes to the
ClientApp function registered for it. This is the only module of ``common`` that knows Flower.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from common.bn.stats import BNSums
from common.updates.site import SiteUpdate, site_label

__all__ = [
    "Action",
    "census_records",
    "claimed_examples",
    "manifest",
    "numpy_to_array",
    "records_to_sums",
    "records_to_update",
    "sums_to_records",
    "update_to_records",
    "wire_bytes",
]


class Action:
    """The message types of the protocol: a Flower category, and for queries the action Flower routes on."""

    ADAPT = "train"  # the shared start goes out; the site adapts and replies with its update
    CENSUS = "query.census"  # how many images the site holds
    SCORE = "query.score"  # label-free scores of one candidate merge on the site's images
    RECALIBRATE = "query.recalibrate"  # BN sums under the merged parameters
    EVALUATE = "evaluate"  # label-free scores of the final model, when the strategy is given an evaluate config
    SECAGG_ADVERTISE = "query.secagg_advertise"  # a second secure sum's public keys (the recalibration's)
    SECAGG_SHARE_KEYS = "query.secagg_share_keys"
    SECAGG_MASKED_INPUT = "query.secagg_masked_input"
    SECAGG_UNMASK = "query.secagg_unmask"


_LAYER = "bn:"
_MAX_COUNT = 2**62  # far above any real count, far below where int64 sums could overflow


def _value_bytes(value: object) -> int:
    """A config or metric value's footprint as Flower counts it: 1 per bool, 8 per number, 1 per character."""
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, str | bytes):
        return len(value)
    return 8


def wire_bytes(content: RecordDict) -> int:
    """The bytes of every record a site sends, as Flower counts them: the one definition of traffic.

    Flower's own ``count_bytes`` of a config or metric record raises on an empty string or
    list, which any site can send; the same rule is applied here without that failure.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(k) + _value_bytes(v) for k, v in record.items())
    return total


def _count(value: object, what: str) -> int:
    """A self-reported count as an int, or ValueError: a reply's numbers are not to be trusted."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if not 0 <= int(value) < _MAX_COUNT:
        raise ValueError(f"{what} = {int(value)} is outside 0..2^62")
    return int(value)


def _counts_record(num_examples: int, counts: Mapping[str, torch.Tensor]) -> MetricRecord:
    record: dict[str, int | list[int]] = {"num-examples": int(num_examples)}
    record.update({f"{_LAYER}{layer}": [int(v) for v in n.reshape(-1)] for layer, n in counts.items()})
    return MetricRecord(record)


def _layer_counts(values: object, layer: str) -> torch.Tensor:
    """One layer's per-channel counts; through NumPy, as torch.tensor on a list is several times slower."""
    items = values if isinstance(values, list) else [values]
    array = np.asarray(items)
    if array.dtype.kind == "i" and array.size and int(array.min()) >= 0 and int(array.max()) < _MAX_COUNT:
        return torch.from_numpy(array.astype(np.int64, copy=False))
    return torch.tensor([_count(v, f"count of BN layer {layer!r}") for v in items], dtype=torch.int64)


def _read_counts(record: MetricRecord) -> tuple[int, dict[str, torch.Tensor]]:
    if "num-examples" not in record:
        raise KeyError("counts record has no 'num-examples'")
    num_examples = _count(record["num-examples"], "num-examples")
    counts = {k[len(_LAYER) :]: _layer_counts(v, k[len(_LAYER) :]) for k, v in record.items() if k.startswith(_LAYER)}
    return num_examples, counts


def claimed_examples(content: RecordDict) -> int:
    """The number of examples a reply claims, read without decoding its tensors."""
    if "counts" not in content:
        raise KeyError("reply has no 'counts' record")
    return _read_counts(content["counts"])[0]


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


_NPY_MAGIC = b"\x93NUMPY"


def _npy_header_end(data: bytes) -> int | None:
    """Where the values start in a .npy version 1 or 2 blob, or None for anything else."""
    if data[:6] != _NPY_MAGIC or len(data) < 12:
        return None
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6] == 2:
        return 12 + int.from_bytes(data[8:12], "little")
    return None


@functools.lru_cache(maxsize=4096)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, count) of a .npy header whose values can be viewed in place, else None.

    Cached on the header bytes: every site sends the same few hundred headers, and
    NumPy's parser (a literal_eval per header) would otherwise cost more than the view.
    """
    head = io.BytesIO(header)
    version = np.lib.format.read_magic(head)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(head)
    if fortran_order or dtype.hasobject or not dtype.isnative:
        return None
    return shape, dtype, math.prod(shape)


def _aliasing_tensor(array: Array) -> torch.Tensor:
    """A tensor over the Array's own bytes, without the copy ``np.load`` makes.

    A reply holds a whole model; ``Array.numpy()`` copies each tensor out of its bytes,
    so converting a reply would cost one more model of memory and a pass over it. The
    tensor is read-only in spirit: it shares the reply's immutable bytes.
    Anything unusual (another serialisation, Fortran order, a foreign byte order) takes
    Flower's own copying path, so the values are always the same as ``to_torch_state_dict``.
    """
    end = _npy_header_end(array.data) if array.stype == SType.NUMPY else None
    layout = _npy_layout(array.data[:end]) if end is not None else None
    if layout is None:
        return torch.from_numpy(array.numpy())
    shape, dtype, count = layout
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=end)
    return torch.from_numpy(values.reshape(shape))


def numpy_to_array(values: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray`` with the same bytes, copied once instead of twice.

    Flower's version ``np.save``s into a growing BytesIO and then copies it out; for the
    merged model on the server that is two passes over a model in fresh memory.
    """
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array.from_numpy_ndarray(values)
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(values)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header too long for version 1.0, as np.save decides
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    data = b"".join((header.getvalue(), values.reshape(-1).view(np.uint8)))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)


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
        site=site_label(info.get("domain", fallback_site), fallback_site),
        params=_arrays_to_tensors(content["params"]),
        buffers=_arrays_to_tensors(content["buffers"]),
        counts=counts,
        num_examples=num_examples,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
    )


def census_records(num_examples: int, site: str) -> RecordDict:
    """A census reply: how many images the site holds, nothing else."""
    return RecordDict(
        {"counts": MetricRecord({"num-examples": int(num_examples)}), "info": ConfigRecord({"domain": site})}
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
    """A recalibration reply's sums per BN layer; raises ``KeyError`` naming a missing record or tensor."""
    if "bnsums" not in content:
        raise KeyError("reply has no 'bnsums' record")
    arrays = _arrays_to_tensors(content["bnsums"])
    layers = [k[: -len(".sum_sq")] for k in arrays if k.endswith(".sum_sq")]
    out = {}
    for layer in layers:
        for leaf in ("sum", "count"):
            if f"{layer}.{leaf}" not in arrays:
                raise KeyError(f"bnsums lack {layer}.{leaf!r}")
        out[layer] = BNSums(arrays[f"{layer}.sum"], arrays[f"{layer}.sum_sq"], arrays[f"{layer}.count"])
    return out


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
