"""The usage stage (being built; no hooks yet)."""
