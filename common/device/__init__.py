"""Where a site computes and at what precision: the setting (read without torch) and what it means on this machine."""
