"""Drivers above models and data: supervised pretraining of the shared start."""
