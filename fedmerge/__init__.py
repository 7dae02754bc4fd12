"""fedmerge: one-shot, BN-aware federated merging of domain-adapted segmentation models."""

__version__ = "0.1.0"
