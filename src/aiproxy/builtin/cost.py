"""The cost stage (being built; no hooks yet)."""
