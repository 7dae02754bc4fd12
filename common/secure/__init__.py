"""Secure aggregation: masked fixed-point sums, and the merge laid out as one such sum."""
