"""Segmentation networks: architectures, the multi-resolution wrapper, model files and published weights."""
