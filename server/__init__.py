"""fedmerge server."""
