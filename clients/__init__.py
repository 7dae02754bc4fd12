"""fedmerge clients."""
