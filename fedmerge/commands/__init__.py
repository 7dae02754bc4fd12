"""One module per ``fedmerge`` sub-command; each exposes ``register(subparsers)``."""
