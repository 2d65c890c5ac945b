"""The limits stage (being built; no hooks yet)."""
