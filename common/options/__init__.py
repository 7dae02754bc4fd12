"""Typed options read from loose text, and the one registry pattern every named choice uses."""
