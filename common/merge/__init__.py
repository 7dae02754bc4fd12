"""The merge: its spec, the parameter methods, BN pooling and the one streaming engine."""
