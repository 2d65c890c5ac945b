"""The cache stage (being built; no hooks yet)."""
