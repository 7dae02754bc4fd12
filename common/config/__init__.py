"""The run configuration: every key typed, read once per process."""
