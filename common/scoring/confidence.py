"""What "confident" means, once: the pseudo-label threshold every loss, metric and score shares.

Kept apart from the tensor code so that option types (which default to it) can be read
without importing torch.
"""

from __future__ import annotations

__all__ = ["CONFIDENCE_THRESHOLD"]

# DAFormer/HRDA's pseudo-label threshold: a pixel whose top probability reaches it counts as confident.
CONFIDENCE_THRESHOLD = 0.968
