"""A SHA-256 fingerprint of a model state, so two parties can agree on weights without sending them.

The server fingerprints the initial model of a run; a site that holds the shared
pretrained weights locally loads its copy and refuses to adapt unless the fingerprints
match. The digest covers every tensor's name, dtype, shape and bytes in key order, so
it does not depend on the file format the weights were stored in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["INITIAL_SHA256", "recipe_key", "state_fingerprint"]

INITIAL_SHA256 = "initial-sha256"  # the train message's config key holding the initial model's fingerprint


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 over (name, dtype, shape, raw bytes) of each tensor, sorted by name."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_key(recipe: object, length: int = 24) -> str:
    """A short hash of everything that produced a result (JSON, keys sorted): names a cache entry.

    Two recipes that differ in any value get different keys, so a stale result is never reused.
    """
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
