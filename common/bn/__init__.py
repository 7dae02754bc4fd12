"""BatchNorm statistics of any torch module: exact sums over an image set, and a bank of several sets."""
