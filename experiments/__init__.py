"""fedmerge experiments."""
