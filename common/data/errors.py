"""The one exception type of the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset on disk is not what its reader expects; the message names the file and the fault."""
