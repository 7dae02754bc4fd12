"""What a site sends, as plain tensors: its parameters, its BN buffers and the counts behind them.

Every layer above works on this one value (the wire format, the site-update file, the
merge engine, the experiments), so it lives apart from any of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["BN_BUFFER_SUFFIXES", "MAX_LABEL", "SiteUpdate", "bn_layer_names", "site_label", "split_state"]

BN_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
MAX_LABEL = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def site_label(text: object, fallback: str = "site") -> str:
    """A site's self-reported name, made safe to show and to store: ``[A-Za-z0-9._-]``, at most 64 characters.

    Whatever a site says about itself is untrusted; reduced like this it can label a
    report row or follow a node id in a file name, and never be a path.
    """
    label = _UNSAFE.sub("_", str(text)).strip("._")[:MAX_LABEL]
    return label or fallback


def bn_layer_names(state: Mapping[str, Tensor]) -> list[str]:
    """BN layers in a state dict, found by their ``running_mean`` buffer."""
    return [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (parameters, BN buffers)."""
    layers = set(bn_layer_names(state))
    params, buffers = {}, {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        is_buffer = layer in layers and f".{leaf}" in BN_BUFFER_SUFFIXES
        (buffers if is_buffer else params)[key] = value
    return params, buffers


@dataclass
class SiteUpdate:
    """What one site sends: parameters, BN buffers, and the counts behind the buffers."""

    site: str
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    counts: dict[str, Tensor]  # BN layer -> int64 [C]: values per channel behind its statistics
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.params, **self.buffers}
