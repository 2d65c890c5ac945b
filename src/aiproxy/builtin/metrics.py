"""The metrics stage (being built; no hooks yet)."""
