"""fedmerge common."""
