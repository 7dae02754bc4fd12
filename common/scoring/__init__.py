"""Scores of a model: mIoU on labeled sets, and label-free scores on a site's own images."""
